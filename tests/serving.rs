//! Serving credentials: each pod gets its own role's credentials, exactly as IMDS formats them, and
//! nothing else.

use std::time::Duration;

use aws_config::imds;
use aws_config::imds::credentials::ImdsCredentialsProvider;
use aws_config::provider_config::ProviderConfig;
use aws_credential_types::provider::ProvideCredentials;
use aws_smithy_async::rt::sleep::TokioSleep;
use http::StatusCode;

use crate::support::Cluster;
use crate::support::agent::{eventually, sdk::FromAddress};
use crate::support::fixtures::{pod, role, service_account, subject};

const CREDS: &str = "/latest/meta-data/iam/security-credentials/";

async fn rust_sdk_credentials(agent_url: &str, source: &str) -> Result<aws_credential_types::Credentials, String> {
    let config = ProviderConfig::empty()
        .with_http_client(FromAddress(source.parse().unwrap()))
        .with_sleep_impl(TokioSleep::new());
    let client = imds::Client::builder()
        .endpoint(agent_url)
        .unwrap()
        .configure(&config)
        .build();
    ImdsCredentialsProvider::builder()
        .configure(&config)
        .imds_client(client)
        .build()
        .provide_credentials()
        .await
        .map_err(|e| format!("{}", aws_smithy_types::error::display::DisplayErrorContext(e)))
}

#[tokio::test]
async fn two_pods_on_two_addresses_each_get_their_own_role_through_the_rust_sdk() {
    let cluster = Cluster::start().await;
    cluster.add_service_account(&service_account("apps", "reader", Some(&role("reader"))));
    cluster.sts.trust(&role("reader"), &subject("apps", "reader"));
    cluster.sts.trust(&role("writer"), &subject("apps", "default"));
    let reader = pod("reader", "127.0.0.2").service_account("reader");
    let writer = pod("writer", "127.0.0.3").role("writer");
    cluster.add_pod(&reader);
    cluster.add_pod(&writer);
    let agent = cluster.agent(&[]).await;

    let a = rust_sdk_credentials(&agent.url(), "127.0.0.2").await.unwrap();
    let b = rust_sdk_credentials(&agent.url(), "127.0.0.3").await.unwrap();

    let a_issued = cluster.sts.whois(a.access_key_id()).expect("minted by STS");
    let b_issued = cluster.sts.whois(b.access_key_id()).expect("minted by STS");
    assert_eq!(
        (a_issued.role_arn.as_str(), a_issued.pod_uid.as_deref().unwrap()),
        (role("reader").as_str(), reader.uid_str())
    );
    assert_eq!(
        (b_issued.role_arn.as_str(), b_issued.pod_uid.as_deref().unwrap()),
        (role("writer").as_str(), writer.uid_str())
    );
    assert_eq!(a_issued.session_name, "apps.reader");
    assert!(a.expiry().is_some());
}

#[tokio::test]
async fn botocore_gets_its_own_pods_role() {
    let cluster = Cluster::start().await;
    cluster.sts.trust(&role("one"), &subject("apps", "default"));
    cluster.sts.trust(&role("two"), &subject("apps", "default"));
    let one = pod("one", "127.0.0.4").role("one");
    let two = pod("two", "127.0.0.5").role("two");
    cluster.add_pod(&one);
    cluster.add_pod(&two);
    let agent = cluster.agent(&[]).await;

    for (source, expected) in [("127.0.0.4", &one), ("127.0.0.5", &two)] {
        let output = crate::support::python::run(
            "tests/probes/botocore_probe.py",
            &[
                ("AWS_EC2_METADATA_SERVICE_ENDPOINT", &agent.url()),
                ("PROBE_SOURCE", source),
            ],
        )
        .await;
        assert_eq!(output["found"], true, "{output}");
        let issued = cluster
            .sts
            .whois(output["access_key_id"].as_str().unwrap())
            .expect("minted by STS");
        assert_eq!(issued.pod_uid.as_deref(), Some(expected.uid_str()));
    }
}

#[tokio::test]
async fn the_role_listing_is_the_bare_role_name_with_or_without_a_slash() {
    let cluster = Cluster::start().await;
    cluster.add_pod(&pod("p", "127.0.0.6").role("team/app"));
    let agent = cluster.agent(&[]).await;
    let caller = agent.from("127.0.0.6");
    for path in [CREDS, "/latest/meta-data/iam/security-credentials"] {
        let reply = caller.get(path, &[]).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.text(), "app", "no trailing newline, no path");
        assert_eq!(reply.headers["server"], "EC2ws");
        assert_eq!(reply.headers["content-type"], "text/plain");
    }
}

#[tokio::test]
async fn the_role_document_has_ec2s_keys_in_ec2s_order_and_time_format() {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("app"));
    cluster.add_pod(&pod("p", "127.0.0.7").role("app"));
    let agent = cluster.agent(&[]).await;
    let reply = agent.from("127.0.0.7").get(&format!("{CREDS}app"), &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.headers["content-type"], "text/plain");
    let text = reply.text();
    let keys: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix('"'))
        .map(|l| l.split('"').next().unwrap())
        .collect();
    assert_eq!(
        keys,
        [
            "Code",
            "LastUpdated",
            "Type",
            "AccessKeyId",
            "SecretAccessKey",
            "Token",
            "Expiration"
        ]
    );
    assert!(
        text.starts_with("{\n  \"Code\" : \"Success\",\n  \"LastUpdated\" : \""),
        "{text}"
    );
    let doc = reply.json();
    let expiration = time::OffsetDateTime::parse(
        doc["Expiration"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert!(doc["Expiration"].as_str().unwrap().ends_with('Z') && doc["Expiration"].as_str().unwrap().len() == 20);
    assert!(expiration - time::OffsetDateTime::now_utc() > time::Duration::minutes(15));
}

#[tokio::test]
async fn another_roles_name_and_the_extended_api_are_not_found() {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("app"));
    cluster.add_pod(&pod("p", "127.0.0.8").role("app"));
    let agent = cluster.agent(&[]).await;
    let caller = agent.from("127.0.0.8");
    assert_eq!(
        caller.get(&format!("{CREDS}admin"), &[]).await.status,
        StatusCode::NOT_FOUND
    );
    let extended = caller
        .get("/latest/meta-data/iam/security-credentials-extended/", &[])
        .await;
    assert_eq!(extended.status, StatusCode::NOT_FOUND);
    assert!(extended.text().contains("<title>404 - Not Found</title>"));
    assert_eq!(caller.get("/latest/user-data", &[]).await.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn iam_info_describes_the_pods_role() {
    let cluster = Cluster::start().await;
    cluster.add_pod(&pod("p", "127.0.0.9").role("app").phase("Pending"));
    let agent = cluster.agent(&[]).await;
    let reply = agent.from("127.0.0.9").get("/latest/meta-data/iam/info", &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
    let doc = reply.json();
    assert_eq!(doc["Code"], "Success");
    assert_eq!(
        doc["InstanceProfileArn"],
        "arn:aws:iam::111111111111:instance-profile/app"
    );
    assert_eq!(cluster.sts.calls(), 0, "iam/info needs no STS call");
}

#[tokio::test]
async fn a_running_pod_is_prefetched_so_its_first_request_is_a_hit() {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("app"));
    cluster.add_pod(&pod("p", "127.0.0.10").role("app"));
    let agent = cluster.agent(&[]).await;
    // Readiness waits for the prefetch, so the call has happened already.
    assert_eq!(cluster.sts.calls(), 1);
    let reply = agent.from("127.0.0.10").get(&format!("{CREDS}app"), &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(cluster.sts.calls(), 1);
    let metrics = agent.metrics().await;
    assert!(
        metrics.contains("imds_broker_credentials_lookups_total{result=\"hit\"} 1"),
        "{metrics}"
    );
    // A pod that starts later is prefetched as soon as it runs.
    cluster.add_pod(&pod("q", "127.0.0.11").role("app"));
    eventually("prefetch of the new pod", || async { cluster.sts.calls() == 2 }).await;
}

#[tokio::test]
async fn concurrent_first_requests_for_one_pod_call_sts_once() {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("app"));
    cluster.sts.set_latency(Duration::from_millis(200));
    // A pending pod with an IP is served but not prefetched: the first requests are real misses.
    cluster.add_pod(&pod("p", "127.0.0.12").role("app").phase("Pending"));
    let agent = cluster.agent(&[]).await;
    let caller = agent.from("127.0.0.12");
    let requests = (0..100).map(|_| async move { caller.get(&format!("{CREDS}app"), &[]).await });
    let replies = futures::future::join_all(requests).await;
    let keys: std::collections::HashSet<String> = replies
        .iter()
        .map(|r| {
            assert_eq!(r.status, StatusCode::OK, "{}", r.text());
            r.json()["AccessKeyId"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(keys.len(), 1);
    assert_eq!(cluster.sts.calls(), 1);
    assert_eq!(cluster.kube.token_request_count(), 1);
}

#[tokio::test]
async fn a_new_pod_reusing_an_ip_never_gets_the_old_pods_credentials() {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("old-role"));
    cluster.sts.trust_any(&role("new-role"));
    let old = pod("old", "127.0.0.13").role("old-role");
    cluster.add_pod(&old);
    let agent = cluster.agent(&[]).await;
    let caller = agent.from("127.0.0.13");
    assert_eq!(caller.get(CREDS, &[]).await.text(), "old-role");

    cluster.kube.delete_pod("apps", "old");
    let new = pod("new", "127.0.0.13").role("new-role");
    cluster.add_pod(&new);
    eventually("the new pod owns the IP", || async {
        caller.get(CREDS, &[]).await.text() == "new-role"
    })
    .await;
    assert_eq!(
        caller.get(&format!("{CREDS}old-role"), &[]).await.status,
        StatusCode::NOT_FOUND
    );
    let doc = caller.get(&format!("{CREDS}new-role"), &[]).await.json();
    let issued = cluster.sts.whois(doc["AccessKeyId"].as_str().unwrap()).unwrap();
    assert_eq!(issued.pod_uid.as_deref(), Some(new.uid_str()));
}

#[tokio::test]
async fn a_deleted_pod_is_forgotten() {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("app"));
    cluster.add_pod(&pod("p", "127.0.0.14").role("app"));
    let agent = cluster.agent(&[]).await;
    let caller = agent.from("127.0.0.14");
    assert_eq!(caller.get(CREDS, &[]).await.status, StatusCode::OK);
    cluster.kube.delete_pod("apps", "p");
    eventually("the pod is gone", || async {
        caller.get(CREDS, &[]).await.status == StatusCode::NOT_FOUND
    })
    .await;
}

#[tokio::test]
async fn a_service_account_annotation_change_takes_effect_without_a_restart() {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("first"));
    cluster.sts.trust_any(&role("second"));
    cluster.add_service_account(&service_account("apps", "app", Some(&role("first"))));
    cluster.add_pod(&pod("p", "127.0.0.15").service_account("app"));
    let agent = cluster.agent(&[]).await;
    let caller = agent.from("127.0.0.15");
    assert_eq!(caller.get(CREDS, &[]).await.text(), "first");
    cluster.add_service_account(&service_account("apps", "app", Some(&role("second"))));
    eventually("the new role is listed", || async {
        caller.get(CREDS, &[]).await.text() == "second"
    })
    .await;
    let doc = caller.get(&format!("{CREDS}second"), &[]).await.json();
    assert_eq!(
        cluster
            .sts
            .whois(doc["AccessKeyId"].as_str().unwrap())
            .unwrap()
            .role_arn,
        role("second")
    );
    assert_eq!(
        caller.get(&format!("{CREDS}first"), &[]).await.status,
        StatusCode::NOT_FOUND
    );
}

// Paused time: the runtime runs every ready task (the request reaches the agent and waits there) before
// the clock moves on, so the pod is created strictly after the request arrived.
#[tokio::test(start_paused = true)]
async fn a_request_from_a_pod_the_watch_has_not_delivered_yet_waits_for_it() {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("app"));
    let agent = cluster.agent(&[]).await;
    let caller = agent.from("127.0.0.16");
    let late = pod("late", "127.0.0.16").role("app");
    let request = tokio::spawn(async move { caller.get(CREDS, &[]).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    cluster.add_pod(&late);
    let reply = request.await.unwrap();
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.text(), "app");
}

#[tokio::test(start_paused = true)]
async fn sessions_are_refreshed_before_they_get_old() {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("app"));
    cluster.add_pod(&pod("p", "127.0.0.17").role("app"));
    // 3600 s sessions with 3590 s kept in reserve: servable for 10 s, refreshed after 4-5 s (paused
    // time: the wait costs nothing).
    let agent = cluster
        .agent(&["--credential-min-remaining", "3590s", "--refresh-check-interval", "1s"])
        .await;
    let caller = agent.from("127.0.0.17");
    let first = caller.get(&format!("{CREDS}app"), &[]).await.json()["AccessKeyId"].clone();
    eventually("a refreshed session is served", || async {
        cluster.sts.calls() >= 2 && caller.get(&format!("{CREDS}app"), &[]).await.json()["AccessKeyId"] != first
    })
    .await;
    let metrics = agent.metrics().await;
    assert!(
        metrics.contains("imds_broker_credentials_fetches_total{cause=\"refresh\",outcome=\"ok\"}"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_pod_annotation_change_takes_effect_without_a_restart() {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("before"));
    cluster.sts.trust_any(&role("after"));
    let before = pod("p", "127.0.0.18").role("before");
    cluster.add_pod(&before);
    let agent = cluster.agent(&[]).await;
    let caller = agent.from("127.0.0.18");
    assert_eq!(caller.get(CREDS, &[]).await.text(), "before");
    cluster.add_pod(&before.clone().annotation("iam.amazonaws.com/role", "after"));
    eventually("the new role is listed", || async {
        caller.get(CREDS, &[]).await.text() == "after"
    })
    .await;
    assert_eq!(
        caller.get(&format!("{CREDS}before"), &[]).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(caller.get(&format!("{CREDS}after"), &[]).await.status, StatusCode::OK);
}

#[tokio::test]
async fn the_agent_calls_sts_unsigned_because_it_holds_no_aws_credentials() {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("app"));
    cluster.add_pod(&pod("p", "127.0.0.19").role("app"));
    let agent = cluster.agent(&[]).await;
    let reply = agent.from("127.0.0.19").get(&format!("{CREDS}app"), &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
    let calls = cluster.sts.call_log();
    assert!(!calls.is_empty());
    assert!(calls.iter().all(|c| !c.signed), "{calls:?}");
}
