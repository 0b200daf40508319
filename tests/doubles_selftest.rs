//! The doubles, proven against the real clients: kube-runtime's watcher and `kube::Api` against
//! [`FakeKube`], aws-sdk-sts against [`FakeSts`], and the JWTs between them.
//!
//! If these fail, every other integration test is suspect: they show the doubles speak the wire
//! protocol the product's clients expect (list-then-watch, 410 relists, bookmarks, pagination,
//! TokenRequest, the STS query protocol and its errors), and that their injected faults (slow lists,
//! late watch events, outages, refused connections, latency) behave as documented on tokio's paused
//! clock.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use aws_sdk_sts::config::Region;
use aws_sdk_sts::error::ProvideErrorMetadata;
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::{Api, DeleteParams, ListParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::watcher::{self, Event};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::support::fixtures::token_request;
use crate::support::jwt::{self, Claims, Signer};
use crate::support::kube::{self as fake, FakeKube, Kind, Outage};
use crate::support::sts::FakeSts;

const LIMIT: Duration = Duration::from_secs(20);
const ROLE: &str = "arn:aws:iam::123456789012:role/app-role";
const OTHER_ROLE: &str = "arn:aws:iam::123456789012:role/other-role";

async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(LIMIT, f).await.expect("test step timed out")
}

async fn next<S, T>(stream: &mut S) -> T
where
    S: Stream<Item = T> + Unpin,
{
    bounded(stream.next()).await.expect("stream ended")
}

fn name<K: kube::Resource>(k: &K) -> String {
    k.meta().name.clone().unwrap_or_default()
}

type PodEvents = tokio::sync::mpsc::UnboundedReceiver<Result<Event<Pod>, watcher::Error>>;

/// Runs a watcher in its own task (as the product does), so it keeps polling while the test waits.
fn watch_pods(kube: &FakeKube, config: watcher::Config) -> PodEvents {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let mut stream = watcher::watcher(Api::<Pod>::all(kube.client()), config).boxed();
    tokio::spawn(async move {
        while let Some(event) = stream.next().await {
            if tx.send(event).is_err() {
                return;
            }
        }
    });
    rx
}

async fn next_event(events: &mut PodEvents) -> Result<Event<Pod>, watcher::Error> {
    bounded(events.recv()).await.expect("watcher ended")
}

/// Reads watcher events up to `InitDone` and returns the names of the objects listed.
async fn initial_list(events: &mut PodEvents) -> Vec<String> {
    let mut names = Vec::new();
    loop {
        match next_event(events).await {
            Ok(Event::Init) => names.clear(),
            Ok(Event::InitApply(pod)) => names.push(name(&pod)),
            Ok(Event::InitDone) => return names,
            Ok(other) => panic!("unexpected event before InitDone: {other:?}"),
            Err(error) => panic!("watch error before InitDone: {error}"),
        }
    }
}

fn sts_client(sts: &FakeSts) -> aws_sdk_sts::Client {
    let config = aws_sdk_sts::Config::builder()
        .behavior_version_latest()
        .region(Region::new("us-east-1"))
        .endpoint_url(sts.url())
        .http_client(aws_smithy_http_client::Builder::new().build_http())
        .retry_config(
            aws_sdk_sts::config::retry::RetryConfig::standard()
                .with_max_attempts(3)
                .with_initial_backoff(Duration::from_millis(5)),
        )
        .build();
    aws_sdk_sts::Client::from_conf(config)
}

async fn assume(
    sts: &aws_sdk_sts::Client,
    role: &str,
    token: &str,
) -> Result<aws_sdk_sts::types::Credentials, (String, String)> {
    sts.assume_role_with_web_identity()
        .role_arn(role)
        .role_session_name("default.app-1")
        .web_identity_token(token)
        .duration_seconds(900)
        .send()
        .await
        .map(|out| out.credentials.expect("credentials"))
        .map_err(|e| {
            let e = e.into_service_error();
            (e.code().unwrap_or("?").to_owned(), e.message().unwrap_or("").to_owned())
        })
}

/// A service account `default/app` and a pod `default/app-1` running as it on `node-1`.
fn seed_app(kube: &FakeKube) -> (String, String) {
    kube.upsert_service_account(fake::service_account("default", "app").role_arn(ROLE));
    let pod = kube.upsert_pod(fake::pod("default", "app-1").service_account("app").ip("10.0.0.11"));
    let uid = pod["metadata"]["uid"].as_str().unwrap().to_owned();
    ("app-1".to_owned(), uid)
}

async fn mint(kube: &FakeKube, sa: &str, pod: &str, uid: &str, audience: &str) -> Result<String, kube::Error> {
    bounded(token_request(kube.client(), "default", sa, (pod, uid), audience)).await
}

#[tokio::test]
async fn watcher_follows_its_node_and_relists_after_compaction() {
    let kube = FakeKube::start().await;
    kube.upsert_pod(fake::pod("default", "a").node(Some("node-1")).ip("10.0.0.1"));
    kube.upsert_pod(fake::pod("default", "elsewhere").node(Some("node-2")).ip("10.0.0.2"));
    let mut events = watch_pods(&kube, watcher::Config::default().fields("spec.nodeName=node-1"));

    assert_eq!(initial_list(&mut events).await, vec!["a"]);
    bounded(kube.wait_for_watches(1)).await;

    kube.upsert_pod(fake::pod("kube-system", "b").node(Some("node-1")).ip("10.0.0.3"));
    match next_event(&mut events).await {
        Ok(Event::Apply(pod)) => assert_eq!(name(&pod), "b"),
        other => panic!("expected Apply(b), got {other:?}"),
    }
    // A pod on another node is invisible; a pod moving away is DELETED for this selector.
    kube.upsert_pod(fake::pod("default", "c").node(Some("node-2")));
    let mut moved = kube.get_pod("default", "a").unwrap();
    moved["spec"]["nodeName"] = json!("node-2");
    kube.upsert_pod(moved);
    match next_event(&mut events).await {
        Ok(Event::Delete(pod)) => assert_eq!(name(&pod), "a"),
        other => panic!("expected Delete(a), got {other:?}"),
    }
    kube.delete_pod("kube-system", "b");
    match next_event(&mut events).await {
        Ok(Event::Delete(pod)) => assert_eq!(name(&pod), "b"),
        other => panic!("expected Delete(b), got {other:?}"),
    }

    // Compaction plus a dropped stream: the resume gets 410 Expired and the watcher relists.
    kube.upsert_pod(fake::pod("default", "d").node(Some("node-1")));
    match next_event(&mut events).await {
        Ok(Event::Apply(pod)) => assert_eq!(name(&pod), "d"),
        other => panic!("expected Apply(d), got {other:?}"),
    }
    let lists_before = kube.request_log().iter().filter(|r| !r.contains("watch=true")).count();
    kube.compact();
    kube.break_watches();
    match next_event(&mut events).await {
        Err(watcher::Error::WatchError(status)) => {
            assert_eq!(status.code, 410);
            assert_eq!(status.reason, "Expired");
        }
        other => panic!("expected a 410 watch error, got {other:?}"),
    }
    assert_eq!(initial_list(&mut events).await, vec!["d"]);
    let lists_after = kube.request_log().iter().filter(|r| !r.contains("watch=true")).count();
    assert_eq!(lists_after, lists_before + 1, "exactly one relist");

    // And it keeps watching after the relist.
    bounded(kube.wait_for_watches(1)).await;
    kube.upsert_pod(fake::pod("default", "e").node(Some("node-1")));
    match next_event(&mut events).await {
        Ok(Event::Apply(pod)) => assert_eq!(name(&pod), "e"),
        other => panic!("expected Apply(e), got {other:?}"),
    }
    // A plain break (no compaction) resumes from the last resourceVersion without a relist.
    kube.break_watches();
    bounded(kube.wait_for_watches(1)).await;
    kube.delete_pod("default", "e");
    match next_event(&mut events).await {
        Ok(Event::Delete(pod)) => assert_eq!(name(&pod), "e"),
        other => panic!("expected Delete(e), got {other:?}"),
    }
    let lists_final = kube.request_log().iter().filter(|r| !r.contains("watch=true")).count();
    assert_eq!(lists_final, lists_after, "no relist after a clean break");
    assert!(kube.request_count() >= 5);
}

#[tokio::test]
async fn streaming_list_watcher_gets_initial_events_and_the_end_bookmark() {
    let kube = FakeKube::start().await;
    kube.upsert_pod(fake::pod("default", "a").node(Some("node-1")));
    let mut events = watch_pods(
        &kube,
        watcher::Config::default()
            .fields("spec.nodeName=node-1")
            .streaming_lists(),
    );
    assert_eq!(initial_list(&mut events).await, vec!["a"]);
    kube.upsert_pod(fake::pod("default", "b").node(Some("node-1")));
    match next_event(&mut events).await {
        Ok(Event::Apply(pod)) => assert_eq!(name(&pod), "b"),
        other => panic!("expected Apply(b), got {other:?}"),
    }
    assert!(kube.request_log().iter().any(|r| r.contains("sendInitialEvents=true")));
}

#[tokio::test]
async fn raw_watch_sends_bookmarks_when_filtered_changes_move_the_version() {
    let kube = FakeKube::start().await;
    kube.set_bookmark_interval(Duration::from_millis(20));
    let api: Api<Pod> = Api::all(kube.client());
    let list = bounded(api.list(&ListParams::default().fields("spec.nodeName=node-1")))
        .await
        .unwrap();
    let rv = list.metadata.resource_version.unwrap();
    let params = WatchParams::default().fields("spec.nodeName=node-1").timeout(60);
    let mut stream = bounded(api.watch(&params, &rv)).await.unwrap().boxed();
    bounded(kube.wait_for_watches(1)).await;
    let other = kube.upsert_pod(fake::pod("default", "x").node(Some("node-2")));
    let want = other["metadata"]["resourceVersion"].as_str().unwrap().to_owned();
    match next(&mut stream).await {
        Ok(WatchEvent::Bookmark(bookmark)) => assert_eq!(bookmark.metadata.resource_version, want),
        other => panic!("expected a bookmark, got {other:?}"),
    }
}

#[tokio::test]
async fn lists_paginate_and_rest_calls_behave_like_the_api_server() {
    let kube = FakeKube::start().await;
    for i in 0..5 {
        kube.upsert_pod(fake::pod("default", &format!("p{i}")).node(Some("node-1")));
    }
    let pods: Api<Pod> = Api::namespaced(kube.client(), "default");
    let first = bounded(pods.list(&ListParams::default().limit(2))).await.unwrap();
    assert_eq!(first.items.len(), 2);
    let token = first.metadata.continue_.clone().expect("continue token");
    assert_eq!(first.metadata.remaining_item_count, Some(3));
    // A write between pages does not change the snapshot.
    kube.upsert_pod(fake::pod("default", "p9").node(Some("node-1")));
    let second = bounded(pods.list(&ListParams::default().limit(10).continue_token(&token)))
        .await
        .unwrap();
    assert_eq!(second.items.len(), 3);
    assert!(second.metadata.continue_.is_none());
    assert_eq!(second.metadata.resource_version, first.metadata.resource_version);

    // Create, conflict, get, replace, delete, not found.
    let accounts: Api<ServiceAccount> = Api::namespaced(kube.client(), "team");
    let mut sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "svc"}})).unwrap();
    let created = bounded(accounts.create(&PostParams::default(), &sa)).await.unwrap();
    assert!(created.metadata.uid.is_some());
    let again = bounded(accounts.create(&PostParams::default(), &sa)).await.unwrap_err();
    assert!(
        matches!(again, kube::Error::Api(ref s) if s.code == 409 && s.reason == "AlreadyExists"),
        "{again}"
    );
    sa = bounded(accounts.get("svc")).await.unwrap();
    sa.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(fake::SA_ROLE_ANNOTATION.into(), ROLE.into());
    let replaced = bounded(accounts.replace("svc", &PostParams::default(), &sa))
        .await
        .unwrap();
    assert_ne!(replaced.metadata.resource_version, sa.metadata.resource_version);
    assert_eq!(replaced.metadata.uid, created.metadata.uid);
    let stale = bounded(accounts.replace("svc", &PostParams::default(), &sa))
        .await
        .unwrap_err();
    assert!(matches!(stale, kube::Error::Api(ref s) if s.code == 409), "{stale}");
    bounded(accounts.delete("svc", &DeleteParams::default())).await.unwrap();
    let gone = bounded(accounts.get("svc")).await.unwrap_err();
    assert!(
        matches!(gone, kube::Error::Api(ref s) if s.code == 404 && s.reason == "NotFound"),
        "{gone}"
    );
    // Label selectors, and the status subresource.
    kube.upsert_pod(fake::pod("default", "web").label("app", "web"));
    let count = |selector: &'static str| {
        let pods = pods.clone();
        async move {
            bounded(pods.list(&ListParams::default().labels(selector)))
                .await
                .unwrap()
                .items
                .len()
        }
    };
    assert_eq!(count("app=web").await, 1);
    assert_eq!(count("app in (web,api)").await, 1);
    assert_eq!(count("app!=web").await, 6);
    assert_eq!(count("!app").await, 6);
    let patch = kube::api::Patch::Merge(json!({"status": {"phase": "Succeeded"}}));
    let patched = bounded(pods.patch_status("web", &Default::default(), &patch))
        .await
        .unwrap();
    assert_eq!(patched.status.unwrap().phase.as_deref(), Some("Succeeded"));
    assert_eq!(patched.metadata.labels.unwrap()["app"], "web");
    let bad = bounded(pods.list(&ListParams::default().fields("spec.nope=x")))
        .await
        .unwrap_err();
    assert!(matches!(bad, kube::Error::Api(ref s) if s.code == 400), "{bad}");
}

#[tokio::test]
async fn kubeconfig_and_discovery_documents_work() {
    let kube = FakeKube::start().await;
    seed_app(&kube);
    let path: PathBuf = std::env::temp_dir().join(format!("doubles-kubeconfig-{}.yaml", jwt::random_uid()));
    std::fs::write(&path, kube.kubeconfig_yaml()).unwrap();
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let config = bounded(kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()))
        .await
        .unwrap();
    let client = kube::Client::try_from(config).unwrap();
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    assert_eq!(bounded(pods.list(&ListParams::default())).await.unwrap().items.len(), 1);

    let jwks = bounded(client.request_text(http::Request::get("/openid/v1/jwks").body(vec![]).unwrap()))
        .await
        .unwrap();
    let jwks: serde_json::Value = serde_json::from_str(&jwks).unwrap();
    assert_eq!(jwks["keys"][0]["kid"], kube.signer().kid());
    let discovery = bounded(
        client.request_text(
            http::Request::get("/.well-known/openid-configuration")
                .body(vec![])
                .unwrap(),
        ),
    )
    .await
    .unwrap();
    let discovery: serde_json::Value = serde_json::from_str(&discovery).unwrap();
    assert_eq!(discovery["issuer"], kube.issuer());
    let unknown = bounded(client.request_text(http::Request::get("/apis/nope/v1/things").body(vec![]).unwrap()))
        .await
        .unwrap_err();
    assert!(matches!(unknown, kube::Error::Api(ref s) if s.code == 404), "{unknown}");
}

#[tokio::test]
async fn token_request_mints_a_pod_bound_token_that_sts_exchanges() {
    let kube = FakeKube::start().await;
    let (pod, uid) = seed_app(&kube);
    let token = mint(&kube, "app", &pod, &uid, jwt::STS_AUDIENCE).await.unwrap();

    let claims = kube.verifier().verify(&token, jwt::STS_AUDIENCE).unwrap();
    assert_eq!(claims.sub, "system:serviceaccount:default:app");
    assert_eq!(claims.iss, jwt::DEFAULT_ISSUER);
    assert_eq!(claims.exp - claims.iat, 3600);
    assert_eq!(claims.pod().unwrap().uid, uid);
    assert_eq!(claims.kubernetes.node.as_ref().unwrap().name, "node-1");
    let records = kube.token_requests();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].pod_uid.as_deref(), Some(uid.as_str()));
    assert_eq!(records[0].audiences, vec![jwt::STS_AUDIENCE]);
    assert_eq!(records[0].status, 201);

    let sts = FakeSts::start(&kube.jwks(), &kube.issuer()).await;
    sts.trust(ROLE, &claims.sub);
    let client = sts_client(&sts);
    let credentials = bounded(assume(&client, ROLE, &token)).await.unwrap();
    assert!(credentials.access_key_id.starts_with("ASIA"));
    assert_eq!(credentials.access_key_id.len(), 20);
    assert!(!credentials.secret_access_key.is_empty() && !credentials.session_token.is_empty());
    let lifetime = credentials.expiration.secs() - jwt::now_unix();
    assert!((890..=900).contains(&lifetime), "expires in {lifetime}s");
    let who = sts.whois(&credentials.access_key_id).expect("issued");
    assert_eq!(who.pod_name.as_deref(), Some("app-1"));
    assert_eq!(who.pod_uid.as_deref(), Some(uid.as_str()));
    assert_eq!(who.role_arn, ROLE);
    assert_eq!(who.duration_seconds, 900);
    assert_eq!(sts.calls(), 1);
    assert_eq!(sts.calls_for(ROLE), 1);

    // A second exchange gets a different key.
    let again = bounded(assume(&client, ROLE, &token)).await.unwrap();
    assert_ne!(again.access_key_id, credentials.access_key_id);
    // The same subject is not trusted for another role.
    let denied = bounded(assume(&client, OTHER_ROLE, &token)).await.unwrap_err();
    assert_eq!(denied.0, "AccessDenied");
    assert_eq!(sts.calls_for(OTHER_ROLE), 1);
    sts.trust_any(OTHER_ROLE);
    bounded(assume(&client, OTHER_ROLE, &token)).await.unwrap();
}

#[tokio::test]
async fn token_request_refuses_like_the_api_server() {
    let kube = FakeKube::start().await;
    let (pod, uid) = seed_app(&kube);
    kube.upsert_service_account(fake::service_account("default", "other"));
    let code = |r: Result<String, kube::Error>| match r {
        Err(kube::Error::Api(status)) => (status.code, status.reason),
        other => panic!("expected an API error, got {:?}", other.map(|_| "a token")),
    };
    assert_eq!(
        code(mint(&kube, "missing", &pod, &uid, "a").await),
        (404, "NotFound".into())
    );
    assert_eq!(
        code(mint(&kube, "app", "no-such-pod", &uid, "a").await),
        (404, "NotFound".into())
    );
    assert_eq!(
        code(mint(&kube, "app", &pod, "0000", "a").await),
        (409, "Conflict".into())
    );
    assert_eq!(
        code(mint(&kube, "other", &pod, &uid, "a").await),
        (400, "BadRequest".into())
    );
    // Not 429/503/504: kube-client retries those up to 15 times with exponential backoff.
    kube.set_token_failure(Some(500));
    assert_eq!(
        code(mint(&kube, "app", &pod, &uid, "a").await),
        (500, "InternalError".into())
    );
    kube.set_token_failure(Some(403));
    assert_eq!(
        code(mint(&kube, "app", &pod, &uid, "a").await),
        (403, "Forbidden".into())
    );
    kube.set_token_failure(None);
    mint(&kube, "app", &pod, &uid, "a").await.unwrap();
    // A deleted and recreated pod has a new UID: the old binding is refused.
    kube.delete_pod("default", &pod);
    kube.upsert_pod(fake::pod("default", &pod).service_account("app"));
    assert_eq!(code(mint(&kube, "app", &pod, &uid, "a").await).0, 409);
    assert!(kube.token_request_count() >= 7);
}

#[tokio::test]
async fn sts_rejects_bad_tokens_with_the_real_error_codes() {
    let kube = FakeKube::start().await;
    let (pod, uid) = seed_app(&kube);
    let sts = FakeSts::start(&kube.jwks(), &kube.issuer()).await;
    sts.trust_any(ROLE);
    let client = sts_client(&sts);
    let token = mint(&kube, "app", &pod, &uid, jwt::STS_AUDIENCE).await.unwrap();

    let tampered = jwt::tamper_payload(&token, |claims| {
        claims["sub"] = json!("system:serviceaccount:kube-system:admin");
    });
    assert_eq!(
        bounded(assume(&client, ROLE, &tampered)).await.unwrap_err().0,
        "InvalidIdentityToken"
    );

    let foreign = Signer::other_key().sign(&jwt::claims_unverified(&token));
    assert_eq!(
        bounded(assume(&client, ROLE, &foreign)).await.unwrap_err().0,
        "InvalidIdentityToken"
    );

    let wrong_audience = mint(&kube, "app", &pod, &uid, "vault").await.unwrap();
    let (code, message) = bounded(assume(&client, ROLE, &wrong_audience)).await.unwrap_err();
    assert_eq!(
        (code.as_str(), message.as_str()),
        ("InvalidIdentityToken", "Incorrect token audience")
    );
    sts.set_audience("vault");
    bounded(assume(&client, ROLE, &wrong_audience)).await.unwrap();
    sts.set_audience(jwt::STS_AUDIENCE);

    let mut expired = jwt::claims_unverified(&token);
    expired.exp = jwt::now_unix() - 1;
    let expired = Signer::test_key().sign(&expired);
    assert_eq!(
        bounded(assume(&client, ROLE, &expired)).await.unwrap_err().0,
        "ExpiredTokenException"
    );

    let wrong_issuer = Claims {
        iss: "https://elsewhere".into(),
        ..jwt::claims_unverified(&token)
    };
    let wrong_issuer = Signer::test_key().sign(&wrong_issuer);
    assert_eq!(
        bounded(assume(&client, ROLE, &wrong_issuer)).await.unwrap_err().0,
        "InvalidIdentityToken"
    );

    let none_alg = Signer::test_key().sign_value(
        &json!({"alg": "none"}),
        &serde_json::to_value(jwt::claims_unverified(&token)).unwrap(),
    );
    assert_eq!(
        bounded(assume(&client, ROLE, &none_alg)).await.unwrap_err().0,
        "InvalidIdentityToken"
    );

    let bad_session = client
        .assume_role_with_web_identity()
        .role_arn(ROLE)
        .role_session_name("has spaces")
        .web_identity_token(&token)
        .send();
    let error = bounded(bad_session).await.unwrap_err().into_service_error();
    assert_eq!(error.code(), Some("ValidationError"));
    assert!(sts.issued().len() == 1, "only the audience-adjusted call succeeded");
}

#[tokio::test]
async fn sts_injects_failures_and_latency() {
    let kube = FakeKube::start().await;
    let (pod, uid) = seed_app(&kube);
    let sts = FakeSts::start(&kube.jwks(), &kube.issuer()).await;
    sts.trust_all(true);
    let client = sts_client(&sts);
    let token = mint(&kube, "app", &pod, &uid, jwt::STS_AUDIENCE).await.unwrap();

    sts.fail_next_with(403, "AccessDenied");
    assert_eq!(
        bounded(assume(&client, ROLE, &token)).await.unwrap_err().0,
        "AccessDenied"
    );
    bounded(assume(&client, ROLE, &token)).await.unwrap();

    // 503 is retried by the SDK: three attempts, all answered 503.
    let before = sts.calls();
    sts.set_failure(Some((503, "ServiceUnavailable")));
    assert_eq!(
        bounded(assume(&client, ROLE, &token)).await.unwrap_err().0,
        "ServiceUnavailable"
    );
    assert_eq!(sts.calls() - before, 3);
    sts.set_failure(None);

    sts.set_latency(Duration::from_millis(200));
    let started = Instant::now();
    bounded(assume(&client, ROLE, &token)).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(200));
    let log = sts.call_log();
    assert_eq!(log.iter().filter(|c| c.outcome == "OK").count(), 2);
    assert_eq!(log.iter().filter(|c| c.status == 503).count(), 3);
    sts.set_latency(Duration::ZERO);

    // Throttling (a 400) and a 500 are retryable for the SDK too.
    for (status, code) in [(400, "Throttling"), (500, "InternalFailure")] {
        let before = sts.calls();
        sts.set_failure(Some((status, code)));
        assert_eq!(bounded(assume(&client, ROLE, &token)).await.unwrap_err().0, code);
        assert_eq!(sts.calls() - before, 3, "{code} retried");
        assert!(
            sts.call_log()[before..]
                .iter()
                .all(|c| c.status == status && c.outcome == code)
        );
    }
    sts.set_failure(None);
    bounded(assume(&client, ROLE, &token)).await.unwrap();
}

/// One HTTP/1.1 exchange over a fresh connection: the raw answer, or the I/O error that ended it.
async fn raw_http(addr: SocketAddr, method: &str, path: &str, body: &str) -> std::io::Result<Vec<u8>> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    Ok(answer)
}

/// The status code and JSON body of a raw answer.
fn parse_answer(answer: &[u8]) -> (u16, serde_json::Value) {
    let text = String::from_utf8_lossy(answer);
    let (head, body) = text.split_once("\r\n\r\n").expect("a complete HTTP answer");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    (status, serde_json::from_str(body).unwrap_or(serde_json::Value::Null))
}

#[tokio::test(start_paused = true)]
async fn kube_list_delay_slows_one_kind_and_answers_with_the_state_at_the_end() {
    let kube = FakeKube::start().await;
    kube.upsert_pod(fake::pod("default", "a"));
    kube.upsert_service_account(fake::service_account("default", "app"));
    let pods: Api<Pod> = Api::all(kube.client());
    let accounts: Api<ServiceAccount> = Api::all(kube.client());
    let names = |list: &kube::core::ObjectList<Pod>| list.items.iter().map(name).collect::<Vec<_>>();

    // Pods slow, service accounts fast.
    kube.set_list_delay(Kind::Pod, Duration::from_secs(5));
    let started = Instant::now();
    let slow = tokio::spawn({
        let pods = pods.clone();
        async move { (pods.list(&ListParams::default()).await.unwrap(), started.elapsed()) }
    });
    let fast = bounded(accounts.list(&ListParams::default())).await.unwrap();
    assert_eq!(fast.items.len(), 1);
    assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let b = kube.upsert_pod(fake::pod("default", "b"));
    let (list, took) = bounded(slow).await.unwrap();
    assert!(took >= Duration::from_secs(5), "answered after {took:?}");
    assert_eq!(names(&list), vec!["a", "b"], "written during the delay, so listed");
    assert_eq!(
        list.metadata.resource_version.as_deref(),
        b["metadata"]["resourceVersion"].as_str()
    );

    // The reverse.
    kube.set_list_delay(Kind::Pod, Duration::ZERO);
    kube.set_list_delay(Kind::ServiceAccount, Duration::from_secs(5));
    let started = Instant::now();
    let slow = tokio::spawn({
        let accounts = accounts.clone();
        async move { (accounts.list(&ListParams::default()).await.unwrap(), started.elapsed()) }
    });
    assert_eq!(bounded(pods.list(&ListParams::default())).await.unwrap().items.len(), 2);
    assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
    let (list, took) = bounded(slow).await.unwrap();
    assert!(took >= Duration::from_secs(5), "answered after {took:?}");
    assert_eq!(list.items.len(), 1);
    // A watch is not a list: it starts at once.
    let rv = kube.resource_version().to_string();
    let started = Instant::now();
    let _stream = bounded(accounts.watch(&WatchParams::default(), &rv)).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
}

#[tokio::test(start_paused = true)]
async fn kube_event_delay_and_jitter_reorder_kinds_but_keep_order_within_a_watch() {
    let kube = FakeKube::start().await;
    let pods: Api<Pod> = Api::all(kube.client());
    let accounts: Api<ServiceAccount> = Api::all(kube.client());
    let rv = kube.resource_version().to_string();
    let params = WatchParams::default().disable_bookmarks().timeout(3600);
    let mut pod_events = bounded(pods.watch(&params, &rv)).await.unwrap().boxed();
    let mut sa_events = bounded(accounts.watch(&params, &rv)).await.unwrap().boxed();
    bounded(kube.wait_for_watches(2)).await;

    // The pod changes first but its event comes last.
    kube.set_event_delay(Kind::Pod, Duration::from_secs(3));
    let written = Instant::now();
    kube.upsert_pod(fake::pod("default", "p"));
    kube.upsert_service_account(fake::service_account("default", "s"));
    match next(&mut sa_events).await {
        Ok(WatchEvent::Added(sa)) => assert_eq!(name(&sa), "s"),
        other => panic!("expected Added(s), got {other:?}"),
    }
    assert!(written.elapsed() < Duration::from_secs(1), "{:?}", written.elapsed());
    match next(&mut pod_events).await {
        Ok(WatchEvent::Added(pod)) => assert_eq!(name(&pod), "p"),
        other => panic!("expected Added(p), got {other:?}"),
    }
    assert!(written.elapsed() >= Duration::from_secs(3), "{:?}", written.elapsed());

    // Jitter spreads the events out, in resourceVersion order.
    kube.set_event_delay(Kind::Pod, Duration::from_secs(1));
    kube.set_event_jitter(Kind::Pod, Duration::from_secs(2));
    let written = Instant::now();
    for i in 0..20 {
        kube.upsert_pod(fake::pod("default", &format!("q{i:02}")));
    }
    let mut arrivals = Vec::new();
    let mut versions = Vec::new();
    for i in 0..20 {
        match next(&mut pod_events).await {
            Ok(WatchEvent::Added(pod)) => {
                assert_eq!(name(&pod), format!("q{i:02}"));
                versions.push(pod.metadata.resource_version.unwrap().parse::<u64>().unwrap());
            }
            other => panic!("expected Added(q{i:02}), got {other:?}"),
        }
        arrivals.push(written.elapsed());
    }
    assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
    assert!(arrivals[0] >= Duration::from_secs(1), "{arrivals:?}");
    assert!(arrivals[19] <= Duration::from_secs(3), "{arrivals:?}");
    assert!(arrivals[19] > Duration::from_secs(1), "no jitter: {arrivals:?}");

    // Back to immediate delivery.
    kube.set_event_delay(Kind::Pod, Duration::ZERO);
    kube.set_event_jitter(Kind::Pod, Duration::ZERO);
    let written = Instant::now();
    kube.delete_pod("default", "p");
    match next(&mut pod_events).await {
        Ok(WatchEvent::Deleted(pod)) => assert_eq!(name(&pod), "p"),
        other => panic!("expected Deleted(p), got {other:?}"),
    }
    assert!(written.elapsed() < Duration::from_secs(1), "{:?}", written.elapsed());
}

#[tokio::test(start_paused = true)]
async fn kube_bookmarks_do_not_overtake_delayed_events() {
    let kube = FakeKube::start().await;
    kube.set_bookmark_interval(Duration::from_millis(100));
    kube.set_event_delay(Kind::Pod, Duration::from_secs(2));
    let pods: Api<Pod> = Api::all(kube.client());
    let rv = kube.resource_version().to_string();
    let params = WatchParams::default().fields("spec.nodeName=node-1").timeout(3600);
    let mut stream = bounded(pods.watch(&params, &rv)).await.unwrap().boxed();
    bounded(kube.wait_for_watches(1)).await;
    let written = Instant::now();
    kube.upsert_pod(fake::pod("default", "mine").node(Some("node-1")));
    let other = kube.upsert_pod(fake::pod("default", "elsewhere").node(Some("node-2")));
    match next(&mut stream).await {
        Ok(WatchEvent::Added(pod)) => assert_eq!(name(&pod), "mine"),
        other => panic!("expected Added(mine) first, got {other:?}"),
    }
    assert!(written.elapsed() >= Duration::from_secs(2), "{:?}", written.elapsed());
    match next(&mut stream).await {
        Ok(WatchEvent::Bookmark(bookmark)) => assert_eq!(
            Some(bookmark.metadata.resource_version.as_str()),
            other["metadata"]["resourceVersion"].as_str()
        ),
        other => panic!("expected a bookmark, got {other:?}"),
    }
}

#[tokio::test]
async fn kube_raw_watch_resuming_after_compaction_gets_410_expired() {
    let kube = FakeKube::start().await;
    let pods: Api<Pod> = Api::all(kube.client());
    let rv = bounded(pods.list(&ListParams::default()))
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut stream = bounded(pods.watch(&WatchParams::default(), &rv)).await.unwrap().boxed();
    bounded(kube.wait_for_watches(1)).await;
    kube.upsert_pod(fake::pod("default", "a"));
    assert!(matches!(next(&mut stream).await, Ok(WatchEvent::Added(_))));
    kube.compact();
    kube.break_watches();
    assert!(bounded(stream.next()).await.is_none(), "the stream ends");
    let mut resumed = bounded(pods.watch(&WatchParams::default(), &rv)).await.unwrap().boxed();
    match next(&mut resumed).await {
        Ok(WatchEvent::Error(status)) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
        }
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
    assert!(
        bounded(resumed.next()).await.is_none(),
        "an ERROR event ends the stream"
    );
}

#[tokio::test(start_paused = true)]
async fn kube_outage_cuts_watches_and_fails_api_requests_until_it_ends() {
    let kube = FakeKube::start().await;
    kube.upsert_pod(fake::pod("default", "a"));
    let pods: Api<Pod> = Api::all(kube.client());
    let watch = || async {
        let rv = kube.resource_version().to_string();
        let stream = bounded(pods.watch(&WatchParams::default().timeout(3600), &rv))
            .await
            .unwrap()
            .boxed();
        bounded(kube.wait_for_watches(1)).await;
        stream
    };

    // Unavailable: watches end, API requests get a 503 Status, control requests still work.
    let mut stream = watch().await;
    kube.set_outage(Some(Outage::Unavailable));
    assert!(bounded(stream.next()).await.is_none(), "the watch is cut");
    assert_eq!(kube.open_watches(), 0);
    let (status, body) = parse_answer(&raw_http(kube.addr(), "GET", "/api/v1/pods", "").await.unwrap());
    assert_eq!(status, 503);
    assert_eq!(body["kind"], "Status");
    assert_eq!(body["reason"], "ServiceUnavailable");
    assert_eq!(body["code"], 503);
    let (status, _) = parse_answer(&raw_http(kube.addr(), "GET", "/_double/stats", "").await.unwrap());
    assert_eq!(status, 200);
    // kube-client retries 503s with backoff, so a list started during the outage succeeds after it.
    let before = kube.request_count();
    let list = tokio::spawn({
        let pods = pods.clone();
        async move { pods.list(&ListParams::default()).await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let attempts = kube.request_count() - before;
    assert!(attempts > 1, "{attempts} attempts in the first second");
    kube.set_outage(None);
    assert_eq!(bounded(list).await.unwrap().unwrap().items.len(), 1);

    // Reset, over the control endpoint: no answer at all, the connection is reset.
    let mut stream = watch().await;
    let (status, _) = parse_answer(
        &raw_http(kube.addr(), "POST", "/_double/outage", r#"{"mode": "reset"}"#)
            .await
            .unwrap(),
    );
    assert_eq!(status, 200);
    assert!(bounded(stream.next()).await.is_none(), "the watch is cut");
    let error = raw_http(kube.addr(), "GET", "/api/v1/pods", "").await.unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "{error}");
    let error = bounded(pods.list(&ListParams::default())).await.unwrap_err();
    assert!(!matches!(error, kube::Error::Api(_)), "no API answer: {error}");
    let rv = kube.resource_version().to_string();
    assert!(bounded(pods.watch(&WatchParams::default(), &rv)).await.is_err());
    assert_eq!(kube.open_watches(), 0);
    let (status, _) = parse_answer(&raw_http(kube.addr(), "POST", "/_double/outage", "null").await.unwrap());
    assert_eq!(status, 200);
    assert_eq!(bounded(pods.list(&ListParams::default())).await.unwrap().items.len(), 1);
    let (status, body) = parse_answer(
        &raw_http(kube.addr(), "POST", "/_double/outage", r#"{"mode": "sometimes"}"#)
            .await
            .unwrap(),
    );
    assert_eq!((status, body["reason"].as_str()), (400, Some("BadRequest")));
}

#[tokio::test(start_paused = true)]
async fn sts_records_concurrency_and_call_times_on_the_tokio_clock() {
    let kube = FakeKube::start().await;
    let (pod, uid) = seed_app(&kube);
    let sts = FakeSts::start(&kube.jwks(), &kube.issuer()).await;
    sts.trust_all(true);
    let client = sts_client(&sts);
    let token = mint(&kube, "app", &pod, &uid, jwt::STS_AUDIENCE).await.unwrap();

    // Five at once, each held by the latency.
    sts.set_latency(Duration::from_secs(10));
    let started = Instant::now();
    let calls: Vec<_> = (0..5)
        .map(|_| {
            let (client, token) = (client.clone(), token.clone());
            tokio::spawn(async move { assume(&client, ROLE, &token).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(sts.in_flight(), 5);
    for call in calls {
        bounded(call).await.unwrap().unwrap();
    }
    assert!(started.elapsed() >= Duration::from_secs(10), "{:?}", started.elapsed());
    assert_eq!((sts.in_flight(), sts.max_in_flight()), (0, 5));

    // One at a time, a minute later.
    sts.reset_max_in_flight();
    assert_eq!(sts.max_in_flight(), 0);
    tokio::time::sleep(Duration::from_secs(60)).await;
    bounded(assume(&client, ROLE, &token)).await.unwrap();
    bounded(assume(&client, ROLE, &token)).await.unwrap();
    assert_eq!(sts.max_in_flight(), 1);

    let log = sts.call_log();
    let minute = |c: &crate::support::sts::Call| c.at.duration_since(started).as_secs() / 60;
    assert_eq!(log.iter().filter(|c| minute(c) == 0).count(), 5);
    assert_eq!(log.iter().filter(|c| minute(c) == 1).count(), 2);
    assert!(log[5].at.duration_since(log[4].at) >= Duration::from_secs(60));
    let serialized = serde_json::to_value(&log[0]).unwrap();
    assert!(serialized.get("at").is_none(), "{serialized}");
}

#[tokio::test]
async fn sts_refuses_connections_while_stopped_and_resumes_with_its_state() {
    let kube = FakeKube::start().await;
    let (pod, uid) = seed_app(&kube);
    let sts = FakeSts::start(&kube.jwks(), &kube.issuer()).await;
    sts.trust(ROLE, "system:serviceaccount:default:app");
    let client = sts_client(&sts);
    let token = mint(&kube, "app", &pod, &uid, jwt::STS_AUDIENCE).await.unwrap();
    let first = bounded(assume(&client, ROLE, &token)).await.unwrap();

    bounded(sts.stop_listening()).await;
    let refused = tokio::net::TcpStream::connect(sts.addr()).await.unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused, "{refused}");
    let failed = bounded(
        client
            .assume_role_with_web_identity()
            .role_arn(ROLE)
            .role_session_name("default.app-1")
            .web_identity_token(&token)
            .send(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(failed, aws_sdk_sts::error::SdkError::DispatchFailure(_)),
        "{failed:?}"
    );
    assert_eq!(sts.calls(), 1);

    bounded(sts.resume_listening()).await;
    let second = bounded(assume(&client, ROLE, &token)).await.unwrap();
    assert_ne!(second.access_key_id, first.access_key_id);
    assert_eq!(
        sts.whois(&first.access_key_id).unwrap().pod_uid.as_deref(),
        Some(uid.as_str())
    );
    assert_eq!(sts.calls(), 2);
    assert_eq!(sts.issued().len(), 2);
}

/// A valid Event as kube's client serialises it, about pod `default/p`.
fn valid_event(name: &str) -> serde_json::Value {
    json!({
        "apiVersion": "events.k8s.io/v1", "kind": "Event",
        "metadata": { "name": name, "namespace": "default" },
        "eventTime": "2026-01-01T00:00:00.000000Z",
        "reportingController": "imds-broker.io/agent", "reportingInstance": "node-1",
        "action": "AssumeRoleWithWebIdentity", "reason": "StsAccessDenied", "type": "Warning",
        "note": "refused",
        "regarding": { "apiVersion": "v1", "kind": "Pod", "namespace": "default", "name": "p", "uid": "u-1" },
    })
}

#[tokio::test]
async fn events_are_validated_like_the_api_server_and_recorded() {
    use k8s_openapi::api::events::v1::Event as K8sEvent;
    use kube::api::{Patch, PatchParams};

    let kube = FakeKube::start().await;
    let events: Api<K8sEvent> = Api::namespaced(kube.client(), "default");
    let status = |result: Result<K8sEvent, kube::Error>| match result {
        Ok(_) => 200,
        Err(kube::Error::Api(s)) => s.code,
        Err(other) => panic!("not an API answer: {other}"),
    };
    let create = |event: serde_json::Value| {
        let events = events.clone();
        async move {
            let event: K8sEvent = serde_json::from_value(event).unwrap();
            status(bounded(events.create(&PostParams::default(), &event)).await)
        }
    };

    // The real client's Event is accepted, stored and recorded.
    assert_eq!(create(valid_event("p.1")).await, 200);
    assert_eq!(kube.events().len(), 1);
    assert_eq!(create(valid_event("p.1")).await, 409, "names are unique");

    // Required fields, limits and closed values.
    for (field, value) in [
        ("eventTime", serde_json::Value::Null),
        ("reportingController", json!("")),
        ("reportingController", json!("not a qualified name!")),
        ("reportingInstance", json!("")),
        ("action", json!("")),
        ("reason", json!("r".repeat(129))),
        ("type", json!("Error")),
        ("note", json!("n".repeat(1025))),
        ("regarding", serde_json::Value::Null),
        (
            "series",
            json!({ "count": 1, "lastObservedTime": "2026-01-01T00:00:00.000000Z" }),
        ),
        ("deprecatedCount", json!(3)),
    ] {
        let mut event = valid_event("p.2");
        event[field] = value;
        assert_eq!(create(event).await, 422, "{field}");
    }
    let mut elsewhere = valid_event("p.2");
    elsewhere["regarding"]["namespace"] = json!("other");
    assert_eq!(create(elsewhere).await, 422, "regarding another namespace");
    let mut longest = valid_event("p.2");
    longest["note"] = json!("n".repeat(1024));
    assert_eq!(create(longest).await, 200, "a note of 1024 bytes fits");

    // Unknown fields are refused, as with fieldValidation=Strict, at any depth.
    for body in [
        json!({ "reasn": "typo" }),
        json!({ "series": { "count": 2, "lastObserved": "2026-01-01T00:00:00Z" } }),
        json!({ "regarding": { "kind": "Pod", "podName": "p" } }),
    ] {
        let mut event = valid_event("p.3");
        event.as_object_mut().unwrap().extend(body.as_object().unwrap().clone());
        let answer = raw_http(
            kube.addr(),
            "POST",
            "/apis/events.k8s.io/v1/namespaces/default/events",
            &event.to_string(),
        )
        .await
        .unwrap();
        let (code, status) = parse_answer(&answer);
        assert_eq!(code, 400, "{body}");
        assert!(
            status["message"].as_str().unwrap().contains("unknown field"),
            "{status}"
        );
    }

    // A series patch is accepted; changing what the API holds immutable, or a bad series, is not.
    let patch = |name: &'static str, body: serde_json::Value| {
        let events = events.clone();
        async move { status(bounded(events.patch(name, &PatchParams::default(), &Patch::Merge(&body))).await) }
    };
    let series = json!({ "series": { "count": 2, "lastObservedTime": "2026-01-01T00:01:00.000000Z" } });
    assert_eq!(patch("p.1", series.clone()).await, 200);
    assert_eq!(
        kube.events().iter().find(|e| e["metadata"]["name"] == "p.1").unwrap()["series"]["count"],
        2
    );
    assert_eq!(
        patch("p.1", json!({ "note": "another" })).await,
        422,
        "note is immutable"
    );
    assert_eq!(
        patch("p.1", json!({ "reason": "Other" })).await,
        422,
        "reason is immutable"
    );
    assert_eq!(
        patch(
            "p.1",
            json!({ "series": { "count": 1, "lastObservedTime": "2026-01-01T00:02:00Z" } })
        )
        .await,
        422
    );
    assert_eq!(patch("missing", series).await, 404);

    let writes = kube.event_writes();
    assert_eq!(writes.first().map(|w| (w.verb, w.status)), Some(("POST", 201)));
    assert_eq!(writes.iter().filter(|w| w.status < 300).count(), 3, "{writes:?}");
}

/// `GET path` through the real client with this `Accept`, as JSON (or the API error).
async fn get_as(kube: &FakeKube, path: &str, accept: &str) -> Result<serde_json::Value, kube::Error> {
    let request = http::Request::get(path)
        .header(http::header::ACCEPT, accept)
        .body(Vec::new())
        .unwrap();
    let text = bounded(kube.client().request_text(request)).await?;
    Ok(serde_json::from_str(&text).unwrap())
}

fn api_code(result: Result<serde_json::Value, kube::Error>) -> u16 {
    match result {
        Err(kube::Error::Api(status)) => status.code,
        other => panic!("expected an API error, got {other:?}"),
    }
}

const METADATA_LIST: &str = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1";
const METADATA: &str = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1";

#[tokio::test]
async fn metadata_only_lists_watches_and_gets_have_the_real_servers_shapes() {
    let kube = FakeKube::start().await;
    kube.upsert_service_account(fake::service_account("team", "svc").role_arn(ROLE));
    let accounts: Api<ServiceAccount> = Api::all(kube.client());

    // kube's metadata API decodes what the double serves.
    let list = bounded(accounts.list_metadata(&ListParams::default())).await.unwrap();
    let annotations = list.items[0].metadata.annotations.clone().unwrap_or_default();
    assert_eq!(
        annotations.get(fake::SA_ROLE_ANNOTATION).map(String::as_str),
        Some(ROLE)
    );
    let mut events = bounded(accounts.watch_metadata(&WatchParams::default(), "0"))
        .await
        .unwrap()
        .boxed();
    match next(&mut events).await.unwrap() {
        WatchEvent::Added(object) => {
            assert_eq!(object.metadata.name.as_deref(), Some("svc"));
            assert_eq!(object.types.unwrap().kind, "PartialObjectMetadata");
        }
        other => panic!("expected Added, got {other:?}"),
    }

    // On the wire: the list type, the item type, and nothing but metadata.
    let list = get_as(&kube, "/api/v1/serviceaccounts", METADATA_LIST).await.unwrap();
    assert_eq!(list["kind"], "PartialObjectMetadataList");
    assert_eq!(list["apiVersion"], "meta.k8s.io/v1");
    let item = list["items"][0].as_object().unwrap();
    let mut keys: Vec<&str> = item.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["apiVersion", "kind", "metadata"]);
    assert_eq!(item["kind"], "PartialObjectMetadata");
    assert_eq!(item["apiVersion"], "meta.k8s.io/v1");
    assert_eq!(item["metadata"]["annotations"][fake::SA_ROLE_ANNOTATION], ROLE);
    let one = get_as(&kube, "/api/v1/namespaces/team/serviceaccounts/svc", METADATA)
        .await
        .unwrap();
    assert_eq!(one["kind"], "PartialObjectMetadata");
    assert!(one.get("secrets").is_none() && one["metadata"]["name"] == "svc");

    // Whole objects without the parameter, or when the first offer cannot be served.
    let whole = get_as(&kube, "/api/v1/serviceaccounts", "application/json")
        .await
        .unwrap();
    assert_eq!(whole["kind"], "ServiceAccountList");
    let fallback = get_as(
        &kube,
        "/api/v1/serviceaccounts",
        &format!("{METADATA},application/json"),
    )
    .await;
    assert_eq!(
        fallback.unwrap()["kind"],
        "ServiceAccountList",
        "a list is not a PartialObjectMetadata"
    );
    // 406 when nothing offered can be served.
    assert_eq!(api_code(get_as(&kube, "/api/v1/serviceaccounts", METADATA).await), 406);
    let table = "application/json;as=Table;g=meta.k8s.io;v=v1";
    assert_eq!(api_code(get_as(&kube, "/api/v1/serviceaccounts", table).await), 406);
}

#[tokio::test]
async fn lists_honour_resource_versions_as_the_watch_cache_does() {
    let kube = FakeKube::start().await;
    for name in ["a", "b", "c"] {
        kube.upsert_pod(fake::pod("default", name));
    }
    let now = kube.resource_version();
    let count = |list: &serde_json::Value| list["items"].as_array().unwrap().len();
    let json = "application/json";

    // The latest version, paginated.
    let latest = get_as(&kube, "/api/v1/pods?limit=1", json).await.unwrap();
    assert_eq!(count(&latest), 1);
    assert!(latest["metadata"]["continue"].is_string());
    // From the cache, whole, whatever the limit: any version, or one not older than asked.
    let any = get_as(&kube, "/api/v1/pods?limit=1&resourceVersion=0", json)
        .await
        .unwrap();
    assert_eq!(count(&any), 3);
    assert!(any["metadata"].get("continue").is_none());
    let not_older = format!("/api/v1/pods?limit=1&resourceVersion={now}&resourceVersionMatch=NotOlderThan");
    let cached = get_as(&kube, &not_older, json).await.unwrap();
    assert_eq!(count(&cached), 3);
    assert_eq!(cached["metadata"]["resourceVersion"], now.to_string());

    // A version the server has not reached, a match without a version, an Exact version compacted.
    // (kube's client retries a 504 with a backoff: asked without it.)
    let ahead = format!(
        "/api/v1/pods?resourceVersion={}&resourceVersionMatch=NotOlderThan",
        now + 100
    );
    let answer = bounded(raw_http(kube.addr(), "GET", &ahead, "")).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
    assert!(answer.contains("Too large resource version"), "{answer}");
    let bare = "/api/v1/pods?resourceVersionMatch=NotOlderThan";
    assert_eq!(api_code(get_as(&kube, bare, json).await), 400);
    kube.compact();
    let exact = format!("/api/v1/pods?resourceVersion={now}&resourceVersionMatch=Exact");
    assert_eq!(api_code(get_as(&kube, &exact, json).await), 410);
    let old = format!("/api/v1/pods?resourceVersion={now}&resourceVersionMatch=NotOlderThan");
    assert_eq!(
        count(&get_as(&kube, &old, json).await.unwrap()),
        3,
        "the cache is newer: fine"
    );

    // What was served is counted.
    let traffic = kube.traffic(Kind::Pod);
    assert_eq!(traffic.lists, 4);
    assert!(traffic.list_bytes > 0);
}
