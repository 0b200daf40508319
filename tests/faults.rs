//! Races and faults: who gets credentials while pods come and go, while the API server or STS is away,
//! and while clients hang up. Every answer here is an outcome; time-dependent cases run in paused time.

use std::time::Duration;

use http::StatusCode;
use time::OffsetDateTime;

use crate::support::Cluster;
use crate::support::agent::eventually;
use crate::support::fixtures::{pod, role};
use crate::support::kube::ContainerFixture;

const CREDS: &str = "/latest/meta-data/iam/security-credentials/";

fn running_since(seconds_ago: i64) -> ContainerFixture {
    ContainerFixture::Running(OffsetDateTime::now_utc() - time::Duration::seconds(seconds_ago))
}

#[tokio::test(start_paused = true)]
async fn a_fetch_outlives_the_clients_that_hung_up_and_every_later_request_joins_it() {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("app"));
    cluster.sts.set_latency(Duration::from_secs(3));
    // Pending: served but not prefetched, so the first request starts the exchange.
    cluster.add_pod(&pod("p", "127.0.8.1").role("app").phase("Pending"));
    // 500 connections at once from one pod: above the default per-address cap, which is not tested here.
    let agent = cluster.agent(&["--max-connections-per-ip", "1000"]).await;
    let caller = agent.from("127.0.8.1");
    let impatient = (0..500).map(|_| async move {
        tokio::time::timeout(Duration::from_millis(100), caller.get(&format!("{CREDS}app"), &[]))
            .await
            .is_err()
    });
    let hung_up = futures::future::join_all(impatient).await;
    assert!(hung_up.iter().all(|h| *h), "every impatient client hung up");
    let patient = caller.get(&format!("{CREDS}app"), &[]).await;
    assert_eq!(patient.status, StatusCode::OK, "{}", patient.text());
    assert_eq!(cluster.sts.calls(), 1);
    assert_eq!(cluster.kube.token_request_count(), 1);
    assert_eq!(
        agent
            .from("127.0.0.1")
            .get("/latest/meta-data/iam/info", &[])
            .await
            .status,
        StatusCode::NOT_FOUND,
        "the agent still answers"
    );
}

#[tokio::test]
async fn a_role_sts_refuses_polled_200_times_costs_a_handful_of_exchanges() {
    let cluster = Cluster::start().await;
    // No trust for the role: STS answers AccessDenied every time.
    cluster.add_pod(&pod("p", "127.0.8.2").role("denied").phase("Pending"));
    let agent = cluster.agent(&[]).await;
    let caller = agent.from("127.0.8.2");
    for _ in 0..200 {
        let doc = caller.get(&format!("{CREDS}denied"), &[]).await.json();
        assert_eq!(doc["Code"], "AssumeRoleUnauthorizedAccess");
        assert!(doc["Message"].as_str().unwrap().contains("AccessDenied"), "{doc}");
    }
    let calls = cluster.sts.calls();
    assert!((1..=3).contains(&calls), "{calls} exchanges for 200 requests");
    assert!(
        agent
            .metric("imds_broker_credentials_lookups_total", "result=\"remembered\"")
            .await
            >= 190.0
    );
}

#[tokio::test(start_paused = true)]
async fn draining_finishes_requests_in_flight_refuses_new_connections_and_is_not_ready() {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("app"));
    cluster.sts.set_latency(Duration::from_millis(1500));
    cluster.add_pod(&pod("p", "127.0.8.3").role("app").phase("Pending"));
    let agent = cluster.agent(&["--shutdown-grace", "10s"]).await;
    let caller = agent.from("127.0.8.3");
    let in_flight = tokio::spawn(async move { caller.get(&format!("{CREDS}app"), &[]).await });
    eventually("the exchange is under way", || async {
        cluster.kube.token_request_count() == 1
    })
    .await;
    agent.begin_stop();
    eventually("not ready while draining", || async { !agent.is_ready().await }).await;
    eventually("new connections refused", || async {
        tokio::net::TcpStream::connect(agent.imds).await.is_err()
    })
    .await;
    let reply = in_flight.await.unwrap();
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    agent.stop().await;
}

#[tokio::test]
async fn a_new_pod_on_a_terminated_pods_ip_never_gets_the_old_pods_credentials() {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("old-role"));
    cluster.sts.trust_any(&role("new-role"));
    let old = pod("old", "127.0.8.4").role("old-role").container(running_since(60));
    cluster.add_pod(&old);
    let agent = cluster.agent(&[]).await;
    let caller = agent.from("127.0.8.4");
    let served = caller.get(&format!("{CREDS}old-role"), &[]).await.json();
    let old_key = served["AccessKeyId"].as_str().unwrap().to_owned();

    // Deleting, containers still running: graceful shutdown keeps its credentials.
    cluster.add_pod(&old.clone().deleting());
    eventually("the deleting pod is seen", || async {
        agent
            .metric("imds_broker_watch_events_total", "resource=\"pods\",event=\"apply\"")
            .await
            >= 1.0
    })
    .await;
    assert_eq!(
        caller.get(&format!("{CREDS}old-role"), &[]).await.status,
        StatusCode::OK
    );

    // Its containers terminate; the CNI frees the address before the API server deletes the pod.
    let done = ContainerFixture::Terminated(OffsetDateTime::now_utc() - time::Duration::seconds(60), 0);
    cluster.add_pod(&old.clone().deleting().container(done));
    eventually("the terminated pod is no longer served", || async {
        caller.get(&format!("{CREDS}old-role"), &[]).await.status == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    // The new pod calls from the same address before its IP is published: refused, never the old role.
    cluster.add_pod(
        &crate::support::kube::pod("apps", "new")
            .role("new-role")
            .container(running_since(1)),
    );
    for path in [CREDS.to_owned(), format!("{CREDS}old-role"), format!("{CREDS}new-role")] {
        let reply = caller.get(&path, &[]).await;
        assert!(
            matches!(reply.status, StatusCode::SERVICE_UNAVAILABLE | StatusCode::NOT_FOUND),
            "{path}: {} {}",
            reply.status,
            reply.text()
        );
        assert!(!reply.text().contains(&old_key));
    }
    cluster.kube.delete_pod("apps", "old");
    cluster.add_pod(&pod("new", "127.0.8.4").role("new-role").container(running_since(1)));
    eventually("the new pod owns the address", || async {
        caller.get(CREDS, &[]).await.text() == "new-role"
    })
    .await;
    let doc = caller.get(&format!("{CREDS}new-role"), &[]).await.json();
    assert_ne!(doc["AccessKeyId"].as_str().unwrap(), old_key);
}

#[tokio::test]
async fn after_a_node_reboot_pods_are_refused_until_the_kubelet_republishes_them() {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("a"));
    cluster.sts.trust_any(&role("b"));
    // The API server still lists both pods as they were before the reboot (started long before this
    // machine's boot time, which the agent reads from /proc/stat): the CNI may have swapped their IPs.
    let before_boot = ContainerFixture::Running(time::macros::datetime!(2000-01-01 0:00 UTC));
    cluster.add_pod(&pod("a", "127.0.8.5").role("a").container(before_boot));
    cluster.add_pod(&pod("b", "127.0.8.6").role("b").container(before_boot));
    let agent = cluster.agent(&[]).await;
    for source in ["127.0.8.5", "127.0.8.6"] {
        let reply = agent.from(source).get(CREDS, &[]).await;
        assert_eq!(
            reply.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{source}: {}",
            reply.text()
        );
    }
    assert_eq!(cluster.sts.calls(), 0, "nothing is prefetched for a held pod");
    // The kubelet republishes them, with their addresses swapped.
    cluster.add_pod(&pod("a", "127.0.8.6").role("a").container(running_since(5)));
    cluster.add_pod(&pod("b", "127.0.8.5").role("b").container(running_since(5)));
    eventually("both republished", || async {
        agent.from("127.0.8.5").get(CREDS, &[]).await.text() == "b"
            && agent.from("127.0.8.6").get(CREDS, &[]).await.text() == "a"
    })
    .await;
}

/// How STS fails in [`sts_outage`].
#[derive(Debug, Clone, Copy)]
enum StsDown {
    ServerError,
    Throttling,
    Refused,
}

/// Runs a pod through an STS outage that starts right after its session was obtained and lasts an
/// hour, polling every 10 s of paused time: no request fails while its credentials are valid, STS
/// sees at most a couple of calls a minute, and the pod gets 503 (never 404) once they are not.
async fn sts_outage(mode: StsDown, source: &str) {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("app"));
    cluster.add_pod(&pod("p", source).role("app").container(running_since(5)));
    let agent = cluster.agent(&[]).await;
    let caller = agent.from(source);
    let path = format!("{CREDS}app");
    let first = caller.get(&path, &[]).await.json();
    let key = first["AccessKeyId"].as_str().unwrap().to_owned();
    let obtained = tokio::time::Instant::now();
    match mode {
        StsDown::ServerError => cluster.sts.set_failure(Some((503, "ServiceUnavailable"))),
        StsDown::Throttling => cluster.sts.set_failure(Some((400, "Throttling"))),
        StsDown::Refused => cluster.sts.stop_listening().await,
    }
    let calls_before = cluster.sts.calls();
    let (mut failed_while_valid, mut not_found) = (0, 0);
    let usable = Duration::from_secs(55 * 60);
    while obtained.elapsed() < Duration::from_secs(65 * 60) {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let reply = caller.get(&path, &[]).await;
        let elapsed = obtained.elapsed();
        if elapsed < usable - Duration::from_secs(60) {
            if reply.status != StatusCode::OK || reply.json()["AccessKeyId"] != key.as_str() {
                failed_while_valid += 1;
            }
        } else if elapsed > usable + Duration::from_secs(60) {
            assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{mode:?} at {elapsed:?}");
        }
        if reply.status == StatusCode::NOT_FOUND {
            not_found += 1;
        }
    }
    assert_eq!(
        failed_while_valid, 0,
        "{mode:?}: requests failed while the credentials were valid"
    );
    assert_eq!(not_found, 0);
    // Refreshes start at 28-35 minutes; from then on retries back off to about one a minute.
    // (A refused connection never reaches STS: then the exchanges are what the agent counts.)
    let calls = match mode {
        StsDown::Refused => {
            agent
                .metric("imds_broker_credentials_fetches_total", "outcome=\"sts_unavailable\"")
                .await as usize
        }
        _ => cluster.sts.calls() - calls_before,
    };
    assert!(
        (5..=2 * 37 + 2).contains(&calls),
        "{mode:?}: {calls} STS calls during the outage"
    );
    // Never more than a few calls in any minute, whatever the pod's SDK does (it asks every 10 s).
    if !matches!(mode, StsDown::Refused) {
        let at: Vec<tokio::time::Instant> = cluster.sts.call_log().iter().map(|c| c.at).collect();
        let busiest = at
            .iter()
            .map(|start| {
                at.iter()
                    .filter(|t| **t >= *start && **t < *start + Duration::from_secs(60))
                    .count()
            })
            .max()
            .unwrap_or(0);
        assert!(busiest <= 4, "{mode:?}: {busiest} STS calls in one minute");
    }
    assert!(
        agent
            .metric("imds_broker_credentials_lookups_total", "result=\"stale\"")
            .await
            > 0.0
    );
    // STS is back: the pod gets its own role again without any restart, once its backoff (at most a
    // minute) has run out.
    match mode {
        StsDown::Refused => cluster.sts.resume_listening().await,
        _ => cluster.sts.set_failure(None),
    }
    agent.until_ok(source, &path, Duration::from_secs(61)).await;
    let doc = caller.get(&path, &[]).await.json();
    assert_ne!(doc["AccessKeyId"], key.as_str());
    assert!(
        cluster
            .sts
            .whois(doc["AccessKeyId"].as_str().unwrap())
            .unwrap()
            .role_arn
            == role("app")
    );
}

#[tokio::test(start_paused = true)]
async fn an_sts_outage_with_server_errors_fails_no_request_while_credentials_are_valid() {
    sts_outage(StsDown::ServerError, "127.0.8.7").await;
}

#[tokio::test(start_paused = true)]
async fn sts_throttling_fails_no_request_while_credentials_are_valid() {
    sts_outage(StsDown::Throttling, "127.0.8.8").await;
}

#[tokio::test(start_paused = true)]
async fn sts_refusing_connections_fails_no_request_while_credentials_are_valid() {
    sts_outage(StsDown::Refused, "127.0.8.9").await;
}

// Paused time: 500 signed TokenRequests take CPU time, which a loaded CI machine may not have within
// the harness's bounded waits; virtual time only moves when every task is idle.
#[tokio::test(start_paused = true)]
async fn five_hundred_pods_prefetched_with_a_limit_of_ten_never_have_more_than_ten_exchanges_in_flight() {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("app"));
    cluster.sts.set_latency(Duration::from_millis(20));
    for i in 0..500 {
        let address = format!("127.0.{}.{}", 20 + i / 250, 1 + i % 250);
        cluster.add_pod(&pod(&format!("p{i}"), &address).role("app"));
    }
    let agent = cluster
        .agent(&["--exchange-concurrency", "10", "--exchange-rate", "100000"])
        .await;
    // Readiness waits until every prefetch was attempted.
    assert_eq!(cluster.sts.calls(), 500);
    let peak = cluster.sts.max_in_flight();
    assert!((2..=10).contains(&peak), "{peak} exchanges at once at STS");
    assert_eq!(
        agent.metric("imds_broker_credentials_exchanges_in_flight", "").await,
        0.0
    );
    let reply = agent.from("127.0.21.250").get(&format!("{CREDS}app"), &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
}
