//! A wire-level double of the node's own EC2 instance metadata service, for EC2 mode.
//!
//! Owns [`FakeImds`]: a plain HTTP/1.1 server on loopback (never the real 169.254.169.254) holding an
//! EC2-like metadata tree, the node's secrets included (an instance-profile role, identity credentials,
//! user-data, identity signatures, spot notices) so tests can prove the agent never fetches them. It
//! enforces IMDSv2 as a hardened instance does (no token or a bad one → 401), answers listings for
//! directories, records every request, and can revoke every token it issued (as an expiry would) to
//! exercise the agent's one re-fetch.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// What the node's metadata answers, by path after `/latest/` (listings are derived).
pub const TREE: &[(&str, &str)] = &[
    ("meta-data/ami-id", "ami-0123456789abcdef0"),
    ("meta-data/hostname", "ip-10-0-0-7.eu-west-1.compute.internal"),
    ("meta-data/local-hostname", "ip-10-0-0-7.eu-west-1.compute.internal"),
    ("meta-data/local-ipv4", "10.0.0.7"),
    ("meta-data/instance-id", "i-0a1b2c3d4e5f60718"),
    ("meta-data/instance-type", "m7g.large"),
    ("meta-data/placement/region", "eu-west-1"),
    ("meta-data/placement/availability-zone", "eu-west-1b"),
    ("meta-data/placement/availability-zone-id", "euw1-az2"),
    ("meta-data/iam/info", NODE_SECRET),
    ("meta-data/iam/security-credentials/node-role", NODE_SECRET),
    (
        "meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
        NODE_SECRET,
    ),
    ("meta-data/spot/instance-action", NODE_SECRET),
    ("user-data", NODE_SECRET),
    (
        "dynamic/instance-identity/document",
        "{\n  \"accountId\" : \"123456789012\",\n  \"availabilityZone\" : \"eu-west-1b\",\n  \
         \"instanceId\" : \"i-0a1b2c3d4e5f60718\",\n  \"region\" : \"eu-west-1\"\n}",
    ),
    ("dynamic/instance-identity/pkcs7", NODE_SECRET),
    ("dynamic/instance-identity/signature", NODE_SECRET),
    ("dynamic/instance-identity/rsa2048", NODE_SECRET),
];

/// The body of everything a pod must never see.
pub const NODE_SECRET: &str = "NODE-SECRET";

/// One request the double received.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The request target exactly as received.
    pub target: String,
    pub token: Option<String>,
}

#[derive(Default)]
struct State {
    tokens: HashSet<String>,
    issued: usize,
    seen: Vec<Seen>,
}

/// A running fake IMDS.
pub struct FakeImds {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: JoinHandle<()>,
}

impl Drop for FakeImds {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeImds {
    /// Starts on a loopback port.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the IMDS double");
        let addr = listener.local_addr().expect("bound");
        let state = Arc::new(Mutex::new(State::default()));
        let task = tokio::spawn(super::wire::serve(listener, None, {
            let state = state.clone();
            move |request| std::future::ready(handle(&state, request))
        }));
        Self { addr, state, task }
    }

    /// The base URL to pass as `--upstream-imds`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request received, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.lock().seen.clone()
    }

    /// How many tokens were issued.
    pub fn tokens_issued(&self) -> usize {
        self.lock().issued
    }

    /// Makes every issued token invalid, as if they had expired.
    pub fn revoke_tokens(&self) {
        self.lock().tokens.clear();
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("IMDS double state")
    }
}

fn handle(state: &Mutex<State>, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let mut state = state.lock().expect("IMDS double state");
    let token = request
        .headers()
        .get("x-aws-ec2-metadata-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    state.seen.push(Seen {
        target: request.uri().to_string(),
        token: token.clone(),
    });
    let path = request.uri().path();
    if path == "/latest/api/token" && request.method() == Method::PUT {
        state.issued += 1;
        let token = format!("upstream-token-{}", state.issued);
        state.tokens.insert(token.clone());
        return reply(StatusCode::OK, &token);
    }
    if !token.is_some_and(|t| state.tokens.contains(&t)) {
        return reply(StatusCode::UNAUTHORIZED, "");
    }
    let Some(path) = path.strip_prefix("/latest/") else {
        return reply(StatusCode::NOT_FOUND, "");
    };
    let path = path.strip_suffix('/').unwrap_or(path);
    if let Some((_, body)) = TREE.iter().find(|(p, _)| *p == path) {
        return reply(StatusCode::OK, body);
    }
    // A directory: the distinct next segments of everything under it, sub-directories with a slash.
    let prefix = if path.is_empty() {
        String::new()
    } else {
        format!("{path}/")
    };
    let entries: BTreeMap<String, ()> = TREE
        .iter()
        .filter_map(|(p, _)| p.strip_prefix(&prefix))
        .map(|rest| match rest.split_once('/') {
            Some((dir, _)) if !path.is_empty() => (format!("{dir}/"), ()),
            Some((dir, _)) => (dir.to_owned(), ()),
            None => (rest.to_owned(), ()),
        })
        .collect();
    if entries.is_empty() {
        return reply(StatusCode::NOT_FOUND, "");
    }
    reply(StatusCode::OK, &entries.into_keys().collect::<Vec<_>>().join("\n"))
}

fn reply(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert("content-type", http::HeaderValue::from_static("text/plain"));
    response
}
