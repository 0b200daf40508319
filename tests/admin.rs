//! The admin endpoint: probes and metrics.

use http::StatusCode;

use crate::support::Cluster;
use crate::support::agent::{NODE, send};
use crate::support::fixtures::{pod, role};

#[tokio::test]
async fn health_readiness_and_metrics_are_served() {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("app"));
    cluster.add_pod(&pod("p", "127.0.0.50").role("app"));
    let agent = cluster.agent(&[]).await;
    let local = "127.0.0.1".parse().unwrap();
    assert_eq!(
        send(agent.admin, local, http::Method::GET, "/healthz", &[])
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        send(agent.admin, local, http::Method::GET, "/readyz", &[]).await.status,
        StatusCode::OK
    );
    agent
        .from("127.0.0.50")
        .get("/latest/meta-data/iam/security-credentials/app", &[])
        .await;
    let metrics = agent.metrics().await;
    for series in [
        "imds_broker_build_info",
        "imds_broker_pods_indexed 1",
        "imds_broker_imds_requests_total{code=\"200\",outcome=\"ok\",route=\"credentials\"} 1",
        "imds_broker_credentials_fetches_total{cause=\"prefetch\",outcome=\"ok\"} 1",
        "imds_broker_imds_request_duration_seconds_bucket",
    ] {
        assert!(metrics.contains(series), "missing {series} in\n{metrics}");
    }
    assert!(
        !metrics.contains("apps/p") && !metrics.contains("arn:aws"),
        "no pod names or ARNs in labels"
    );
}

#[tokio::test]
async fn the_agent_stops_cleanly_on_shutdown() {
    let cluster = Cluster::start().await;
    let agent = cluster.agent(&[]).await;
    agent.stop().await;
}

#[test]
fn the_readme_documents_every_flag_and_its_environment_variable() {
    use clap::CommandFactory;
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let command = imds_broker::config::Cli::command();
    for arg in command.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if matches!(long, "help" | "version") {
            continue;
        }
        assert!(
            readme.contains(&format!("`--{long}")),
            "README does not document --{long}"
        );
        if let Some(env) = arg.get_env() {
            let env = env.to_string_lossy();
            assert!(
                readme.contains(&format!("`{env}`")),
                "README does not name {env} for --{long}"
            );
        }
    }
}

#[tokio::test]
async fn the_readme_documents_every_metric_the_agent_serves() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let cluster = Cluster::start().await;
    // Every optional part on, so that its series are served too.
    let agent = cluster.agent(&["--container-credentials"]).await;
    let metrics = agent.metrics().await;
    let names: std::collections::BTreeSet<&str> = metrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_whitespace().next())
        .collect();
    assert!(names.len() > 20, "{names:?}");
    for name in names {
        assert!(readme.contains(&format!("`{name}`")), "README does not document {name}");
    }
}

#[tokio::test(start_paused = true)]
async fn the_startup_taint_comes_off_the_agents_own_node_once_it_is_ready_and_nothing_else_does() {
    let cluster = Cluster::start().await;
    let taint = "imds-broker.io/agent-not-ready";
    cluster.kube.upsert_node(
        NODE,
        &[("node.kubernetes.io/not-ready", "NoSchedule"), (taint, "NoSchedule")],
    );
    cluster.kube.upsert_node("node-2", &[(taint, "NoSchedule")]);
    // Slow lists: the agent is not ready for a while, and the taint must stay until it is.
    cluster
        .kube
        .set_list_delay(crate::support::kube::Kind::Pod, std::time::Duration::from_secs(20));
    let agent = cluster.agent_unready(&["--startup-taint", taint]).await;
    tokio::time::sleep(std::time::Duration::from_secs(15)).await;
    assert!(!agent.is_ready().await);
    assert_eq!(
        cluster.kube.node_taints(NODE).unwrap(),
        vec!["node.kubernetes.io/not-ready", taint],
        "removed before the agent was ready"
    );
    agent.wait_ready().await;
    crate::support::agent::eventually("the taint is removed", || async {
        cluster.kube.node_taints(NODE).unwrap() == vec!["node.kubernetes.io/not-ready"]
    })
    .await;
    assert_eq!(
        cluster.kube.node_taints("node-2").unwrap(),
        vec![taint],
        "another node's taint"
    );
}

#[tokio::test]
async fn a_server_that_does_not_manage_iptables_is_ready_only_while_the_capture_container_vouches() {
    let cluster = Cluster::start().await;
    let status = std::env::temp_dir().join(format!("imds-broker-capture-{}-{}", std::process::id(), line!()));
    let _ = std::fs::remove_file(&status);
    let agent = cluster
        .agent_unready(&["--capture-status-file", status.to_str().unwrap()])
        .await;
    let unix = |d: u64| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + d
    };
    // A twin started after it, whose capture container has vouched from the start: once the twin is
    // ready, everything else readiness waits for (the same cluster's views, the prefetch) is in reach,
    // and only the missing word can keep the first one unready.
    let vouched = status.with_extension("vouched");
    imds_broker::netfilter::status::write(&vouched, unix(90)).unwrap();
    let twin = cluster
        .agent(&["--capture-status-file", vouched.to_str().unwrap()])
        .await;
    assert!(twin.is_ready().await);
    assert!(!agent.is_ready().await, "ready without the capture container's word");
    let _ = std::fs::remove_file(&vouched);
    imds_broker::netfilter::status::write(&status, unix(90)).unwrap();
    agent.wait_ready().await;
    // Withdrawn (the capture container stopped, or a pass failed): not ready again.
    imds_broker::netfilter::status::write(&status, 0).unwrap();
    crate::support::agent::eventually("not ready once the vouching is withdrawn", || async {
        !agent.is_ready().await
    })
    .await;
    let _ = std::fs::remove_file(&status);
}

/// Every `imds_broker_*` name in the dashboard and the alerting rules (histograms by their `_bucket`,
/// `_count` or `_sum` series, as the expressions use them).
fn names_used_by_dashboard_and_rules() -> std::collections::BTreeSet<String> {
    let name = regex::Regex::new(r"imds_broker_[a-z0-9_]*[a-z0-9]").unwrap();
    let mut names = std::collections::BTreeSet::new();
    for file in [
        "dashboards/imds-broker.json",
        "deploy/prometheus/rules.yaml",
        "deploy/components/prometheus-rules/prometheusrule.yaml",
    ] {
        let text = std::fs::read_to_string(format!("{}/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        let found: Vec<String> = name.find_iter(&text).map(|m| m.as_str().to_owned()).collect();
        assert!(!found.is_empty(), "no metric names in {file}");
        names.extend(found);
    }
    names
}

#[tokio::test]
async fn every_series_the_dashboard_and_the_rules_use_exists_from_start_up() {
    let cluster = Cluster::start().await;
    // Freshly started: not even ready, no pod, no request, no exchange, no iptables.
    let agent = cluster.agent_unready(&[]).await;
    let metrics = agent.metrics().await;
    let sampled: std::collections::BTreeSet<&str> = metrics
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split(['{', ' ']).next())
        .collect();
    let names = names_used_by_dashboard_and_rules();
    assert!(names.len() >= 15, "{names:?}");
    let missing: Vec<&String> = names.iter().filter(|n| !sampled.contains(n.as_str())).collect();
    assert!(
        missing.is_empty(),
        "no series at start-up for {missing:?} in\n{metrics}"
    );
    // Labelled series the panels break down by exist for their known values, at zero.
    for series in [
        "imds_broker_watch_errors_total{resource=\"pods\"} 0",
        "imds_broker_watch_errors_total{resource=\"namespaces\"} 0",
        "imds_broker_iptables_repairs_total 0",
        "imds_broker_iptables_reconciles_total{result=\"error\"} 0",
        "imds_broker_sts_request_duration_seconds_count{outcome=\"sts_refused\"} 0",
        "imds_broker_sa_token_request_duration_seconds_count{outcome=\"ok\"} 0",
        "imds_broker_imds_tokens_rejected_total{reason=\"wrong_caller\"} 0",
        // The text encoder writes +Inf as `inf`, which Go's ParseFloat (and so Prometheus) reads.
        "imds_broker_credentials_expiry_headroom_seconds inf",
        "imds_broker_credentials_first_delay_seconds_count 0",
    ] {
        assert!(metrics.contains(series), "missing {series} in\n{metrics}");
    }
    assert!(metrics.contains("imds_broker_watch_silence_seconds{resource=\"serviceaccounts\"}"));
    agent.stop().await;
}

#[tokio::test]
async fn readiness_tokens_and_sts_calls_are_counted() {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("app"));
    cluster.add_pod(&pod("p", "127.0.0.51").role("app"));
    let agent = cluster.agent(&[]).await;
    let pod = agent.from("127.0.0.51");
    let token = String::from_utf8(pod.token("60").await.body.to_vec()).unwrap();
    pod.get(
        "/latest/meta-data/iam/security-credentials/app",
        &[("x-aws-ec2-metadata-token", &token)],
    )
    .await;
    pod.get(
        "/latest/meta-data/iam/security-credentials/app",
        &[("x-aws-ec2-metadata-token", "garbage")],
    )
    .await;
    let metrics = agent.metrics().await;
    for series in [
        "imds_broker_ready 1",
        "imds_broker_imds_tokens_issued_total 1",
        "imds_broker_imds_tokens_rejected_total{reason=\"malformed\"} 1",
        "imds_broker_sts_request_duration_seconds_count{outcome=\"ok\"} 1",
        "imds_broker_sa_token_request_duration_seconds_count{outcome=\"ok\"} 1",
    ] {
        assert!(metrics.contains(series), "missing {series} in\n{metrics}");
    }
    let headroom = metrics
        .lines()
        .find_map(|l| l.strip_prefix("imds_broker_credentials_expiry_headroom_seconds "))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap();
    // The STS double's sessions last an hour; the prefetched one was obtained moments ago.
    assert!(headroom > 3000.0 && headroom <= 3600.0, "{headroom}");
    agent.stop().await;
}

#[tokio::test]
async fn the_build_info_metric_names_the_version_and_the_git_revision() {
    let cluster = Cluster::start().await;
    let agent = cluster.agent(&[]).await;
    let metrics = agent.metrics().await;
    let samples: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("imds_broker_build_info{"))
        .collect();
    // The encoder sorts labels by name.
    let expected = format!(
        "imds_broker_build_info{{revision=\"{}\",version=\"{}\"}} 1",
        env!("IMDS_BROKER_REVISION"),
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(samples, [expected.as_str()], "in\n{metrics}");
    assert!(
        !env!("IMDS_BROKER_REVISION").is_empty() && !env!("IMDS_BROKER_REVISION").contains('"'),
        "a revision label of its own"
    );
}
