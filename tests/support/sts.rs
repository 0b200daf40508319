//! A wire-level double of AWS STS `AssumeRoleWithWebIdentity` (query protocol, XML answers).
//!
//! Owns [`FakeSts`]: a plain HTTP/1.1 server on loopback that takes the form-encoded request
//! aws-sdk-sts (and botocore, the JS SDK) send to `POST /`, verifies the web identity token (RS256
//! signature against the Kubernetes double's JWKS, `exp`/`nbf` with no leeway, `iss`, `aud` containing
//! the configured audience), checks a trust map of role ARN → allowed `sub`, and answers with the real
//! `AssumeRoleWithWebIdentityResponse` or STS `ErrorResponse` XML, status codes and `x-amzn-RequestId`.
//!
//! It records every call and every credential it issued together with the pod the token was bound to,
//! so a test can prove which pod a credential was minted for ([`FakeSts::whois`]), when each call
//! arrived and how many were served at once. Latency (on tokio's clock) and failures can be injected,
//! and the listener can be closed and reopened to refuse connections. `/_double/...` endpoints expose
//! the controls over HTTP for scripts (see [`FakeSts`]). Tokens and secrets are never logged.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::jwt::{self, Claims, Verifier, VerifyError};

/// The STS XML namespace.
const XMLNS: &str = "https://sts.amazonaws.com/doc/2011-06-15/";

/// One credential the double issued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Issued {
    /// `ASIA…`
    pub access_key_id: String,
    /// The role assumed.
    pub role_arn: String,
    /// `RoleSessionName`.
    pub session_name: String,
    /// Effective `DurationSeconds`.
    pub duration_seconds: i64,
    /// Expiration, RFC 3339.
    pub expiration: String,
    /// The token's `sub`.
    pub sub: String,
    /// The token's `kubernetes.io.namespace`.
    pub namespace: String,
    /// The token's `kubernetes.io.serviceaccount.name`.
    pub service_account: String,
    /// The token's `kubernetes.io.pod.name`.
    pub pod_name: Option<String>,
    /// The token's `kubernetes.io.pod.uid`.
    pub pod_uid: Option<String>,
}

/// One `AssumeRoleWithWebIdentity` call and how it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Call {
    /// `RoleArn`, if sent.
    pub role_arn: Option<String>,
    /// `RoleSessionName`, if sent.
    pub session_name: Option<String>,
    /// HTTP status answered.
    pub status: u16,
    /// `"OK"` or the error code answered.
    pub outcome: String,
    /// When the request arrived, on tokio's clock (paused in compressed-time tests).
    #[serde(skip)]
    pub at: Instant,
    /// The request carried a SigV4 signature or AWS credentials (`Authorization`,
    /// `X-Amz-Security-Token`, or their query-string forms).
    pub signed: bool,
}

struct StsState {
    audience: String,
    trusted: HashSet<(String, String)>,
    trusted_any: HashSet<String>,
    trust_all: bool,
    policies: HashMap<String, Value>,
    latency: Duration,
    failure: Option<(u16, String)>,
    fail_next: VecDeque<(u16, String)>,
    max_session_duration: i64,
    calls: Vec<Call>,
    issued: Vec<Issued>,
    by_key: HashMap<String, usize>,
}

struct StsShared {
    verifier: Verifier,
    state: Mutex<StsState>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

impl StsShared {
    fn lock(&self) -> MutexGuard<'_, StsState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Counts one `AssumeRoleWithWebIdentity` as in flight until dropped (answered, or abandoned by a
/// closed connection).
struct InFlight<'a>(&'a StsShared);

impl<'a> InFlight<'a> {
    fn enter(shared: &'a StsShared) -> Self {
        let now = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        shared.max_in_flight.fetch_max(now, Ordering::SeqCst);
        Self(shared)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The accept loop and the connections of one listening period.
struct Listening {
    accept: JoinHandle<()>,
    shutdown: watch::Sender<bool>,
}

impl Listening {
    fn start(shared: &Arc<StsShared>, listener: TcpListener) -> Self {
        let shutdown = watch::Sender::new(false);
        let accept = tokio::spawn(super::wire::serve(listener, Some(shutdown.subscribe()), {
            let shared = shared.clone();
            move |req| handle(shared.clone(), req)
        }));
        Self { accept, shutdown }
    }

    /// Closes the listening socket and every open connection, without waiting.
    fn abort(&self) {
        self.accept.abort();
        let _ = self.shutdown.send(true);
    }

    /// Closes the listening socket and every open connection, and waits until they are closed.
    async fn stop(self) {
        self.abort();
        let _ = self.accept.await;
        // Every connection task holds a receiver until its connection is dropped.
        self.shutdown.closed().await;
    }
}

/// The STS double. Dropping it stops the server.
///
/// Control endpoints (for scripts): `POST /_double/trust` `{"role_arn": ..., "sub": ...}` (no `sub`:
/// any subject); `POST /_double/trust-all` `{"enabled": true}`; `GET /_double/calls` →
/// `{"calls": n, "issued": [...], "log": [...]}`; `GET /_double/whois?access_key_id=ASIA…`;
/// `POST /_double/failure` `{"status": 503, "code": "ServiceUnavailable", "once": false}` or `null`;
/// `POST /_double/latency` `{"ms": 250}`; `POST /_double/audience` `{"audience": "..."}`.
pub struct FakeSts {
    shared: Arc<StsShared>,
    addr: SocketAddr,
    listening: Mutex<Option<Listening>>,
}

impl Drop for FakeSts {
    fn drop(&mut self) {
        if let Some(listening) = self.listening.get_mut().unwrap_or_else(|e| e.into_inner()).take() {
            listening.abort();
        }
    }
}

impl FakeSts {
    /// Starts on `127.0.0.1:0`, trusting tokens signed by a key in `jwks` with issuer `issuer`
    /// (e.g. `FakeSts::start(&kube.jwks(), &kube.issuer())`). Panics if it cannot bind.
    pub async fn start(jwks: &Value, issuer: &str) -> Self {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), jwks, issuer)
            .await
            .expect("bind the STS double")
    }

    /// Starts on `addr` (use a loopback address).
    pub async fn start_on(addr: SocketAddr, jwks: &Value, issuer: &str) -> std::io::Result<Self> {
        let verifier = Verifier::from_jwks(jwks, issuer).map_err(std::io::Error::other)?;
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(StsShared {
            verifier,
            state: Mutex::new(StsState {
                audience: jwt::STS_AUDIENCE.to_owned(),
                trusted: HashSet::new(),
                trusted_any: HashSet::new(),
                trust_all: false,
                policies: HashMap::new(),
                latency: Duration::ZERO,
                failure: None,
                fail_next: VecDeque::new(),
                max_session_duration: 43_200,
                calls: Vec::new(),
                issued: Vec::new(),
                by_key: HashMap::new(),
            }),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        });
        let listening = Mutex::new(Some(Listening::start(&shared, listener)));
        Ok(Self {
            shared,
            addr,
            listening,
        })
    }

    fn listening(&self) -> MutexGuard<'_, Option<Listening>> {
        self.listening.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Closes the listening socket, so connecting to [`FakeSts::addr`] is refused, and ends every open
    /// connection (requests in progress get no answer). Returns once both are closed. The state
    /// (trust rules, calls, issued credentials) is kept for [`FakeSts::resume_listening`].
    pub async fn stop_listening(&self) {
        let stopped = self.listening().take();
        if let Some(listening) = stopped {
            listening.stop().await;
        }
    }

    /// Listens on the same address again after [`FakeSts::stop_listening`], with the same state.
    /// Does nothing if it is listening. Panics if the address cannot be bound again.
    pub async fn resume_listening(&self) {
        if self.listening().is_some() {
            return;
        }
        let listener = TcpListener::bind(self.addr).await.expect("bind the STS double again");
        let mut listening = self.listening();
        if listening.is_none() {
            *listening = Some(Listening::start(&self.shared, listener));
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Lets `sub` (`system:serviceaccount:<ns>:<sa>`) assume `role_arn`.
    pub fn trust(&self, role_arn: &str, sub: &str) {
        self.shared.lock().trusted.insert((role_arn.to_owned(), sub.to_owned()));
    }

    /// Lets `role_arn` be assumed by the tokens an IAM trust policy document allows (evaluated as
    /// IAM does, see `policy_allows`), besides any other trust rule.
    pub fn trust_policy(&self, role_arn: &str, policy: Value) {
        self.shared.lock().policies.insert(role_arn.to_owned(), policy);
    }

    /// Lets any valid token assume `role_arn`.
    pub fn trust_any(&self, role_arn: &str) {
        self.shared.lock().trusted_any.insert(role_arn.to_owned());
    }

    /// Lets any valid token assume any role (or stops doing so).
    pub fn trust_all(&self, enabled: bool) {
        self.shared.lock().trust_all = enabled;
    }

    /// The audience tokens must contain (default `sts.amazonaws.com`).
    pub fn set_audience(&self, audience: &str) {
        self.shared.lock().audience = audience.to_owned();
    }

    /// The largest `DurationSeconds` accepted (default 43200; real roles default to 3600).
    pub fn set_max_session_duration(&self, seconds: i64) {
        self.shared.lock().max_session_duration = seconds;
    }

    /// Delay added before answering each `AssumeRoleWithWebIdentity`.
    pub fn set_latency(&self, latency: Duration) {
        self.shared.lock().latency = latency;
    }

    /// Answers the next call with `status` and error `code` (queued; one call each).
    pub fn fail_next_with(&self, status: u16, code: &str) {
        self.shared.lock().fail_next.push_back((status, code.to_owned()));
    }

    /// Answers every call with `(status, code)` until set back to `None`.
    pub fn set_failure(&self, failure: Option<(u16, &str)>) {
        self.shared.lock().failure = failure.map(|(s, c)| (s, c.to_owned()));
    }

    /// `AssumeRoleWithWebIdentity` calls received (including failed and retried ones).
    pub fn calls(&self) -> usize {
        self.shared.lock().calls.len()
    }

    /// Calls received for `role_arn`.
    pub fn calls_for(&self, role_arn: &str) -> usize {
        self.shared
            .lock()
            .calls
            .iter()
            .filter(|c| c.role_arn.as_deref() == Some(role_arn))
            .count()
    }

    /// `AssumeRoleWithWebIdentity` requests being processed now, from their arrival until their answer
    /// is handed to the connection (injected latency included).
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst)
    }

    /// The most [`FakeSts::in_flight`] requests seen at once since the start or the last
    /// [`FakeSts::reset_max_in_flight`].
    pub fn max_in_flight(&self) -> usize {
        self.shared.max_in_flight.load(Ordering::SeqCst)
    }

    /// Starts counting [`FakeSts::max_in_flight`] again from the requests in flight now.
    pub fn reset_max_in_flight(&self) {
        self.shared
            .max_in_flight
            .store(self.shared.in_flight.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    /// Every call, in the order they were answered.
    pub fn call_log(&self) -> Vec<Call> {
        self.shared.lock().calls.clone()
    }

    /// Every credential issued, in order.
    pub fn issued(&self) -> Vec<Issued> {
        self.shared.lock().issued.clone()
    }

    /// The credential with this access key id, with the pod its token was bound to.
    pub fn whois(&self, access_key_id: &str) -> Option<Issued> {
        let st = self.shared.lock();
        st.by_key.get(access_key_id).map(|&i| st.issued[i].clone())
    }
}

// ---------------------------------------------------------------------------------------------------
// HTTP plumbing

type Body = Full<Bytes>;

fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

fn xml_response(status: u16, request_id: &str, xml: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "text/xml")
        .header("x-amzn-RequestId", request_id)
        .body(Full::new(Bytes::from(xml)))
        .expect("response")
}

fn json_response(status: u16, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(body).expect("json"))))
        .expect("response")
}

/// An STS error: HTTP status, code and message.
struct StsError {
    status: u16,
    code: String,
    message: String,
}

impl StsError {
    fn new(status: u16, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            code: code.to_owned(),
            message: message.into(),
        }
    }

    fn validation(message: impl Into<String>) -> Self {
        Self::new(400, "ValidationError", message)
    }

    fn invalid_token(detail: impl Into<String>) -> Self {
        Self::new(400, "InvalidIdentityToken", detail)
    }

    fn injected(status: u16, code: &str) -> Self {
        let message = match code {
            "ServiceUnavailable" => "Service is unavailable. Please try again later.",
            "Throttling" => "Rate exceeded",
            "AccessDenied" => "Not authorized to perform sts:AssumeRoleWithWebIdentity",
            "IDPCommunicationError" => "Couldn't retrieve verification key from your identity provider",
            "InternalFailure" => "An internal error occurred.",
            _ => "Injected failure",
        };
        Self::new(status, code, message)
    }

    fn response(&self, request_id: &str) -> Response<Body> {
        let kind = if self.status >= 500 { "Receiver" } else { "Sender" };
        xml_response(
            self.status,
            request_id,
            format!(
                "<ErrorResponse xmlns=\"{XMLNS}\">\n  <Error>\n    <Type>{kind}</Type>\n    <Code>{}</Code>\n    \
                 <Message>{}</Message>\n  </Error>\n  <RequestId>{request_id}</RequestId>\n</ErrorResponse>\n",
                xml_escape(&self.code),
                xml_escape(&self.message),
            ),
        )
    }
}

async fn handle(shared: Arc<StsShared>, req: Request<Incoming>) -> Response<Body> {
    let arrived = Instant::now();
    let signed = req.headers().contains_key("authorization")
        || req.headers().contains_key("x-amz-security-token")
        || req
            .uri()
            .query()
            .is_some_and(|q| q.contains("X-Amz-Signature") || q.contains("X-Amz-Credential"));
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or_default().to_owned();
    let body = match req.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::new(),
    };
    if let Some(rest) = path.strip_prefix("/_double/") {
        return control(&shared, &method, rest, &query, &body);
    }
    let request_id = jwt::random_uid();
    if path != "/" || !(method == Method::POST || method == Method::GET) {
        return StsError::new(404, "UnknownOperationException", "Unknown operation").response(&request_id);
    }
    let mut params = super::wire::parse(&query);
    params.extend(super::wire::parse(&String::from_utf8_lossy(&body)));
    let _in_flight = match params.get("Action").map(String::as_str) {
        Some("AssumeRoleWithWebIdentity") => InFlight::enter(&shared),
        Some(other) => {
            return StsError::new(
                400,
                "InvalidAction",
                format!("Could not find operation {other} for version 2011-06-15"),
            )
            .response(&request_id);
        }
        None => return StsError::new(400, "MissingAction", "Missing Action").response(&request_id),
    };
    let latency = shared.lock().latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let role_arn = params.get("RoleArn").cloned();
    let session_name = params.get("RoleSessionName").cloned();
    let result = assume(&shared, &params, &request_id);
    let mut st = shared.lock();
    st.calls.push(Call {
        role_arn,
        session_name,
        status: result.as_ref().map_or_else(|e| e.status, |_| 200),
        outcome: result.as_ref().map_or_else(|e| e.code.clone(), |_| "OK".to_owned()),
        at: arrived,
        signed,
    });
    drop(st);
    match result {
        Ok(xml) => xml_response(200, &request_id, xml),
        Err(error) => error.response(&request_id),
    }
}

struct Role {
    account: String,
    name: String,
}

/// Whether an IAM trust policy lets a web identity with `claims` assume a role of `account`, as IAM
/// decides for AssumeRoleWithWebIdentity: an `Allow` statement for the action whose federated principal
/// is the OIDC provider named after the token's `iss`, all of whose conditions hold. Conditions know
/// `StringEquals` and `StringLike` (`*`, `?`) on `<provider>:sub` and `<provider>:aud`; anything else
/// fails the statement. No `Deny` statements (the agent's policies have none).
fn policy_allows(policy: &Value, account: &str, claims: &Claims) -> bool {
    let host = claims.iss.strip_prefix("https://").unwrap_or(&claims.iss);
    let host = host.strip_suffix('/').unwrap_or(host);
    let provider = format!("arn:aws:iam::{account}:oidc-provider/{host}");
    let one_or_many = |v: &Value| -> Vec<String> {
        match v {
            Value::String(s) => vec![s.clone()],
            Value::Array(a) => a.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect(),
            _ => Vec::new(),
        }
    };
    let claim = |key: &str| -> Option<Vec<String>> {
        match key.strip_prefix(host)?.strip_prefix(':')? {
            "sub" => Some(vec![claims.sub.clone()]),
            "aud" => Some(claims.aud.clone()),
            _ => None,
        }
    };
    let statements = policy.get("Statement").map(one_or_many_values).unwrap_or_default();
    statements.iter().any(|statement| {
        statement.get("Effect").and_then(Value::as_str) == Some("Allow")
            && statement
                .get("Action")
                .map(one_or_many)
                .is_some_and(|actions| actions.iter().any(|a| a == "sts:AssumeRoleWithWebIdentity"))
            && statement
                .pointer("/Principal/Federated")
                .map(one_or_many)
                .is_some_and(|principals| principals.contains(&provider))
            && statement
                .get("Condition")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
                .all(|(operator, tests)| {
                    tests.as_object().into_iter().flatten().all(|(key, expected)| {
                        let (Some(values), expected) = (claim(key), one_or_many(expected)) else {
                            return false;
                        };
                        values.iter().any(|value| {
                            expected.iter().any(|pattern| match operator.as_str() {
                                "StringEquals" => value == pattern,
                                "StringLike" => glob(pattern.as_bytes(), value.as_bytes()),
                                _ => false,
                            })
                        })
                    })
                })
    })
}

fn one_or_many_values(v: &Value) -> Vec<Value> {
    match v {
        Value::Array(a) => a.clone(),
        other => vec![other.clone()],
    }
}

/// IAM's `StringLike`: `*` is any run of characters, `?` any one character.
fn glob(pattern: &[u8], value: &[u8]) -> bool {
    match (pattern.first(), value.first()) {
        (None, None) => true,
        (Some(b'*'), _) => glob(&pattern[1..], value) || (!value.is_empty() && glob(pattern, &value[1..])),
        (Some(b'?'), Some(_)) => glob(&pattern[1..], &value[1..]),
        (Some(p), Some(v)) if p == v => glob(&pattern[1..], &value[1..]),
        _ => false,
    }
}

fn parse_role_arn(arn: &str) -> Option<Role> {
    let mut parts = arn.splitn(6, ':');
    let (prefix, partition, service, region, account, resource) = (
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
    );
    let valid = prefix == "arn"
        && partition.starts_with("aws")
        && service == "iam"
        && region.is_empty()
        && account.len() == 12
        && account.bytes().all(|b| b.is_ascii_digit());
    let name = resource.strip_prefix("role/")?.rsplit('/').next()?;
    (valid && !name.is_empty()).then(|| Role {
        account: account.to_owned(),
        name: name.to_owned(),
    })
}

fn random_string(alphabet: &[u8], len: usize) -> String {
    (0..len)
        .map(|_| alphabet[rand::random_range(0..alphabet.len())] as char)
        .collect()
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    let t = t.replace_nanosecond(0).expect("zero nanoseconds");
    t.format(&time::format_description::well_known::Rfc3339)
        .expect("RFC 3339")
}

fn assume(shared: &StsShared, params: &HashMap<String, String>, request_id: &str) -> Result<String, StsError> {
    {
        let mut st = shared.lock();
        if let Some((status, code)) = st.fail_next.pop_front().or_else(|| st.failure.clone()) {
            return Err(StsError::injected(status, &code));
        }
    }
    let required = |name: &str| {
        params.get(name).filter(|v| !v.is_empty()).ok_or_else(|| {
            StsError::validation(format!(
                "1 validation error detected: Value null at '{}' failed to satisfy constraint: Member must not be null",
                lower_first(name)
            ))
        })
    };
    let role_arn = required("RoleArn")?;
    let session_name = required("RoleSessionName")?;
    let token = required("WebIdentityToken")?;
    if role_arn.len() < 20 || role_arn.len() > 2048 {
        return Err(StsError::validation(format!(
            "1 validation error detected: Value '{role_arn}' at 'roleArn' failed to satisfy constraint: Member must have length greater than or equal to 20"
        )));
    }
    if session_name.len() < 2
        || session_name.len() > 64
        || !session_name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_+=,.@-".contains(c))
    {
        return Err(StsError::validation(format!(
            "1 validation error detected: Value '{session_name}' at 'roleSessionName' failed to satisfy constraint: \
             Member must satisfy regular expression pattern: [\\w+=,.@-]* and have length between 2 and 64"
        )));
    }
    if token.len() < 4 || token.len() > 20_000 {
        return Err(StsError::validation(
            "1 validation error detected: Value at 'webIdentityToken' failed to satisfy constraint: Member must have length between 4 and 20000",
        ));
    }
    let max_duration = shared.lock().max_session_duration;
    let duration: i64 = match params.get("DurationSeconds").filter(|v| !v.is_empty()) {
        Some(d) => d
            .parse()
            .map_err(|_| StsError::validation(format!("Invalid DurationSeconds {d:?}")))?,
        None => 3600,
    };
    if duration < 900 {
        return Err(StsError::validation(format!(
            "1 validation error detected: Value '{duration}' at 'durationSeconds' failed to satisfy constraint: Member must have value greater than or equal to 900"
        )));
    }
    if duration > max_duration {
        return Err(StsError::validation(
            "The requested DurationSeconds exceeds the MaxSessionDuration set for this role.",
        ));
    }
    let role = parse_role_arn(role_arn).ok_or_else(|| StsError::validation("Request ARN is invalid"))?;

    let audience = shared.lock().audience.clone();
    let claims = shared.verifier.verify(token, &audience).map_err(|e| match e {
        VerifyError::Expired { exp, now } => StsError::new(
            400,
            "ExpiredTokenException",
            format!("Token expired: current date/time {now} must be before the expiration date/time{exp}"),
        ),
        VerifyError::WrongAudience { .. } => StsError::invalid_token("Incorrect token audience"),
        VerifyError::WrongIssuer(iss) => {
            StsError::invalid_token(format!("No OpenIDConnect provider found in your account for {iss}"))
        }
        other => StsError::invalid_token(format!(
            "The web identity token that was passed could not be validated by AWS. Get a new identity token from the identity provider and then retry the request. ({other})"
        )),
    })?;

    let mut st = shared.lock();
    let allowed = st.trust_all
        || st.trusted_any.contains(role_arn)
        || st.trusted.contains(&(role_arn.clone(), claims.sub.clone()))
        || st
            .policies
            .get(role_arn)
            .is_some_and(|policy| policy_allows(policy, &role.account, &claims));
    if !allowed {
        return Err(StsError::new(
            403,
            "AccessDenied",
            "Not authorized to perform sts:AssumeRoleWithWebIdentity",
        ));
    }

    const UPPER: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let access_key_id = loop {
        let candidate = format!("ASIA{}", random_string(UPPER, 16));
        if !st.by_key.contains_key(&candidate) {
            break candidate;
        }
    };
    let secret = random_string(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/", 40);
    let session_token = format!(
        "IQoJb3JpZ2luX2VjE{}",
        STANDARD.encode((0..240).map(|_| rand::random::<u8>()).collect::<Vec<u8>>())
    );
    let expiration = rfc3339(time::OffsetDateTime::now_utc() + time::Duration::seconds(duration));
    let role_id = format!("AROA{}", random_string(UPPER, 17).chars().take(17).collect::<String>());
    let provider = format!(
        "arn:aws:iam::{}:oidc-provider/{}",
        role.account,
        shared.verifier.issuer().trim_start_matches("https://")
    );
    let assumed_arn = format!(
        "arn:aws:sts::{}:assumed-role/{}/{session_name}",
        role.account, role.name
    );
    let pod = claims.pod();
    let issued = Issued {
        access_key_id: access_key_id.clone(),
        role_arn: role_arn.clone(),
        session_name: session_name.clone(),
        duration_seconds: duration,
        expiration: expiration.clone(),
        sub: claims.sub.clone(),
        namespace: claims.kubernetes.namespace.clone(),
        service_account: claims.kubernetes.serviceaccount.name.clone(),
        pod_name: pod.map(|p| p.name.clone()),
        pod_uid: pod.map(|p| p.uid.clone()),
    };
    let index = st.issued.len();
    st.issued.push(issued);
    st.by_key.insert(access_key_id.clone(), index);
    drop(st);

    Ok(format!(
        "<AssumeRoleWithWebIdentityResponse xmlns=\"{XMLNS}\">\n  <AssumeRoleWithWebIdentityResult>\n    \
         <Audience>{audience}</Audience>\n    <AssumedRoleUser>\n      <AssumedRoleId>{role_id}:{session}</AssumedRoleId>\n      \
         <Arn>{assumed_arn}</Arn>\n    </AssumedRoleUser>\n    <Provider>{provider}</Provider>\n    <Credentials>\n      \
         <AccessKeyId>{access_key_id}</AccessKeyId>\n      <SecretAccessKey>{secret}</SecretAccessKey>\n      \
         <SessionToken>{session_token}</SessionToken>\n      <Expiration>{expiration}</Expiration>\n    </Credentials>\n    \
         <SubjectFromWebIdentityToken>{sub}</SubjectFromWebIdentityToken>\n  </AssumeRoleWithWebIdentityResult>\n  \
         <ResponseMetadata>\n    <RequestId>{request_id}</RequestId>\n  </ResponseMetadata>\n</AssumeRoleWithWebIdentityResponse>\n",
        audience = xml_escape(&audience),
        session = xml_escape(session_name),
        assumed_arn = xml_escape(&assumed_arn),
        provider = xml_escape(&provider),
        sub = xml_escape(&claims.sub),
    ))
}

fn lower_first(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_ascii_lowercase().to_string() + c.as_str())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------------
// Control endpoints for scripts

fn control(shared: &StsShared, method: &Method, rest: &str, query: &str, body: &[u8]) -> Response<Body> {
    let v: Value = if body.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => return json_response(400, &json!({ "error": e.to_string() })),
        }
    };
    let ok = || json_response(200, &json!({ "ok": true }));
    let field = |name: &str| v.get(name).and_then(Value::as_str).map(str::to_owned);
    match (method, rest) {
        (&Method::POST, "trust") => {
            let Some(role) = field("role_arn") else {
                return json_response(400, &json!({ "error": "role_arn is required" }));
            };
            let mut st = shared.lock();
            match field("sub") {
                Some(sub) => st.trusted.insert((role, sub)),
                None => st.trusted_any.insert(role),
            };
            ok()
        }
        (&Method::POST, "trust-all") => {
            shared.lock().trust_all = v.get("enabled").and_then(Value::as_bool).unwrap_or(true);
            ok()
        }
        (&Method::GET, "calls") => {
            let st = shared.lock();
            json_response(
                200,
                &json!({ "calls": st.calls.len(), "issued": st.issued, "log": st.calls }),
            )
        }
        (&Method::GET, "whois") => {
            let key = super::wire::parse(query).remove("access_key_id").unwrap_or_default();
            let st = shared.lock();
            match st.by_key.get(&key) {
                Some(&i) => json_response(200, &json!(st.issued[i])),
                None => json_response(404, &json!({ "error": "unknown access key id" })),
            }
        }
        (&Method::POST, "failure") => {
            let mut st = shared.lock();
            if v.is_null() {
                st.failure = None;
                st.fail_next.clear();
                return ok();
            }
            let status = v.get("status").and_then(Value::as_u64).unwrap_or(503) as u16;
            let code = field("code").unwrap_or_else(|| "ServiceUnavailable".to_owned());
            if v.get("once").and_then(Value::as_bool).unwrap_or(false) {
                st.fail_next.push_back((status, code));
            } else {
                st.failure = Some((status, code));
            }
            ok()
        }
        (&Method::POST, "latency") => {
            let ms = v.get("ms").and_then(Value::as_u64).unwrap_or(0);
            shared.lock().latency = Duration::from_millis(ms);
            ok()
        }
        (&Method::POST, "audience") => match field("audience") {
            Some(audience) => {
                shared.lock().audience = audience;
                ok()
            }
            None => json_response(400, &json!({ "error": "audience is required" })),
        },
        _ => json_response(404, &json!({ "error": "unknown control endpoint" })),
    }
}
