//! What the agent's view of the cluster is worth, and what it answers from it: nothing before it is
//! whole, 503 while it is stale or the API server is away, known pods served through an outage, new
//! pods seen within seconds of the API server's return. Time runs paused: every wait is compressed.

use std::time::Duration;

use http::StatusCode;
use time::OffsetDateTime;
use tokio::time::Instant;

use crate::support::Cluster;
use crate::support::fixtures::{pod, role, service_account};
use crate::support::kube::{ContainerFixture, Kind, Outage};

const CREDS: &str = "/latest/meta-data/iam/security-credentials/";

fn running() -> ContainerFixture {
    ContainerFixture::Running(OffsetDateTime::now_utc() - time::Duration::seconds(5))
}

/// The IRSA pod must get its service account's role, never `--default-role`, whichever list is slow.
async fn nothing_is_answered_before_the_view_is_whole(slow: Kind, source: &str) {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("irsa"));
    cluster.sts.trust_any(&role("fallback"));
    cluster.add_service_account(&service_account("apps", "irsa", Some(&role("irsa"))));
    cluster.add_pod(&pod("p", source).service_account("irsa").container(running()));
    cluster.kube.upsert_namespace("apps", &[]);
    cluster.kube.set_list_delay(slow, Duration::from_secs(20));
    let agent = cluster.agent_unready(&["--default-role", &role("fallback")]).await;
    let (before, listing) = agent.until_ok(source, CREDS, Duration::from_secs(60)).await;
    assert_eq!(listing, "irsa", "{slow:?} slow");
    // Each refused request waited --pod-wait (500 ms) for the view first: 20 s make about 33.
    assert!(
        before.len() >= 25,
        "{slow:?} slow: only {} refusals before the lists completed",
        before.len()
    );
    assert!(
        before.iter().all(|s| *s == StatusCode::SERVICE_UNAVAILABLE),
        "{slow:?} slow: {before:?}"
    );
    let doc = agent.from(source).get(&format!("{CREDS}irsa"), &[]).await.json();
    let issued = cluster.sts.whois(doc["AccessKeyId"].as_str().unwrap()).unwrap();
    assert_eq!(issued.role_arn, role("irsa"));
    assert!(
        cluster
            .sts
            .call_log()
            .iter()
            .all(|c| c.role_arn.as_deref() == Some(&*role("irsa")))
    );
}

#[tokio::test(start_paused = true)]
async fn with_the_service_account_list_slow_nothing_is_answered_before_the_view_is_whole() {
    nothing_is_answered_before_the_view_is_whole(Kind::ServiceAccount, "127.0.9.1").await;
}

#[tokio::test(start_paused = true)]
async fn with_the_pod_list_slow_nothing_is_answered_before_the_view_is_whole() {
    nothing_is_answered_before_the_view_is_whole(Kind::Pod, "127.0.9.2").await;
}

#[tokio::test(start_paused = true)]
async fn with_the_namespace_list_slow_nothing_is_answered_before_the_view_is_whole() {
    nothing_is_answered_before_the_view_is_whole(Kind::Namespace, "127.0.9.3").await;
}

#[tokio::test(start_paused = true)]
async fn after_410_gone_the_agent_refuses_until_it_has_relisted_and_never_serves_a_deleted_pods_role() {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("old-role"));
    cluster.sts.trust_any(&role("new-role"));
    cluster.add_pod(&pod("old", "127.0.9.4").role("old-role").container(running()));
    let agent = cluster.agent(&[]).await;
    let caller = agent.from("127.0.9.4");
    assert_eq!(caller.get(CREDS, &[]).await.text(), "old-role");
    // The agent misses the old pod's deletion and the new pod's creation: the API server is away,
    // then its history is compacted, so the watch resumes into a 410.
    cluster.kube.set_outage(Some(Outage::Reset));
    cluster.kube.delete_pod("apps", "old");
    cluster.add_pod(&pod("new", "127.0.9.4").role("new-role").container(running()));
    cluster.kube.compact();
    cluster.kube.set_list_delay(Kind::Pod, Duration::from_secs(10));
    cluster.kube.set_outage(None);
    let started = Instant::now();
    while agent
        .metric("imds_broker_watch_relists_total", "resource=\"pods\",cause=\"gone\"")
        .await
        < 1.0
    {
        assert!(started.elapsed() < Duration::from_secs(30), "no relist after 410");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!agent.is_ready().await, "not ready while relisting");
    let (before, listing) = agent.until_ok("127.0.9.4", CREDS, Duration::from_secs(30)).await;
    assert_eq!(listing, "new-role");
    assert!(
        !before.is_empty() && before.iter().all(|s| *s == StatusCode::SERVICE_UNAVAILABLE),
        "{before:?}"
    );
    assert!(agent.is_ready().await);
}

#[tokio::test(start_paused = true)]
async fn a_plain_disconnect_resumes_from_the_last_version_and_refuses_nobody() {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("app"));
    cluster.add_pod(&pod("p", "127.0.9.12").role("app").container(running()));
    let agent = cluster.agent(&[]).await;
    let caller = agent.from("127.0.9.12");
    for _ in 0..20 {
        cluster.kube.break_watches();
        tokio::task::yield_now().await;
        assert_eq!(caller.get(CREDS, &[]).await.text(), "app");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Resumed, never relisted: nothing was missed.
    assert_eq!(
        agent.metric("imds_broker_watch_relists_total", "cause=\"gone\"").await,
        0.0
    );
    assert_eq!(
        agent
            .metric("imds_broker_watch_relists_total", "resource=\"pods\",cause=\"initial\"")
            .await,
        1.0
    );
    // And a pod created after the cuts is seen.
    cluster.add_pod(&pod("q", "127.0.9.13").role("app").container(running()));
    agent.until_ok("127.0.9.13", CREDS, Duration::from_secs(5)).await;
}

#[tokio::test(start_paused = true)]
async fn a_silent_watch_is_relisted_and_bookmarks_keep_a_quiet_one_alive() {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("app"));
    cluster.add_pod(&pod("p", "127.0.9.5").role("app").container(running()));
    let agent = cluster.agent(&["--watch-idle-timeout", "60s"]).await;
    let idle = |resource: &'static str| {
        let agent = &agent;
        async move {
            agent
                .metric(
                    "imds_broker_watch_relists_total",
                    &format!("resource=\"{resource}\",cause=\"idle\""),
                )
                .await
        }
    };
    // Nothing changes anywhere: no events and no bookmarks (the resourceVersion does not move).
    tokio::time::sleep(Duration::from_secs(150)).await;
    assert!(idle("pods").await >= 2.0, "a silent watch is relisted");
    assert_eq!(
        agent.from("127.0.9.5").get(CREDS, &[]).await.status,
        StatusCode::OK,
        "an idle relist does not refuse anyone"
    );
    // Something elsewhere changes every 20 s: the pod watch gets bookmarks and is left alone.
    let before = idle("pods").await;
    for i in 0..9 {
        cluster.kube.upsert_namespace(&format!("other-{i}"), &[]);
        tokio::time::sleep(Duration::from_secs(20)).await;
    }
    assert_eq!(idle("pods").await, before, "bookmarks count as life");
    assert!(
        agent
            .metric("imds_broker_watch_events_total", "resource=\"pods\",event=\"bookmark\"")
            .await
            > 0.0
    );
    assert!(
        agent
            .metric("imds_broker_watch_silence_seconds", "resource=\"pods\"")
            .await
            < 60.0
    );
}

/// Through an outage of several minutes known pods keep their credentials and unknown addresses get
/// 503; when the API server returns, pods created right after are served within seconds.
async fn an_api_outage(outage: Outage, sources: [&str; 3]) {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("app"));
    cluster.add_pod(&pod("known", sources[0]).role("app").container(running()));
    let agent = cluster.agent(&[]).await;
    let known = agent.from(sources[0]);
    let path = format!("{CREDS}app");
    assert_eq!(known.get(&path, &[]).await.status, StatusCode::OK);
    cluster.kube.set_outage(Some(outage));
    let started = Instant::now();
    let mut unknown_refusals = Vec::new();
    while started.elapsed() < Duration::from_secs(6 * 60) {
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(
            known.get(&path, &[]).await.status,
            StatusCode::OK,
            "{outage:?}: known pod at {:?}",
            started.elapsed()
        );
        if started.elapsed() > Duration::from_secs(10) {
            unknown_refusals.push(agent.from(sources[1]).get(CREDS, &[]).await.status);
        }
    }
    assert!(
        unknown_refusals.iter().all(|s| *s == StatusCode::SERVICE_UNAVAILABLE),
        "{outage:?}: an unseen address during the outage: {unknown_refusals:?}"
    );
    cluster.kube.set_outage(None);
    let back = Instant::now();
    // Churn right after: one pod created, one deleted.
    cluster.add_pod(&pod("fresh", sources[2]).role("app").container(running()));
    cluster.kube.delete_pod("apps", "known");
    let (_, listing) = agent.until_ok(sources[2], CREDS, Duration::from_secs(30)).await;
    assert_eq!(listing, "app");
    assert!(
        back.elapsed() <= Duration::from_secs(10),
        "{outage:?}: new pod served {:?} after the outage",
        back.elapsed()
    );
    let started = Instant::now();
    while known.get(CREDS, &[]).await.status != StatusCode::NOT_FOUND {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{outage:?}: the deleted pod is still served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn an_api_server_answering_503_for_minutes_costs_known_pods_nothing() {
    an_api_outage(Outage::Unavailable, ["127.0.9.6", "127.0.9.7", "127.0.9.8"]).await;
}

#[tokio::test(start_paused = true)]
async fn an_api_server_resetting_connections_for_minutes_costs_known_pods_nothing() {
    an_api_outage(Outage::Reset, ["127.0.9.9", "127.0.9.10", "127.0.9.11"]).await;
}
