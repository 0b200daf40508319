//! The metadata surface besides credentials: in EC2 mode an allow-list proxied to the node's IMDS (a
//! loopback double here) with a hard deny-list behind it; on-prem, region, zone and identity
//! synthesised from flags or the Node's labels (followed without a restart); listings that show only what is served; hardened request parsing on the
//! wire; IMDSv2 tokens that survive a restart when keyed from a file.

use std::net::SocketAddr;
use std::time::Duration;

use aws_config::imds;
use aws_config::imds::region::ImdsRegionProvider;
use aws_config::provider_config::ProviderConfig;
use aws_smithy_async::rt::sleep::TokioSleep;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

use crate::support::Cluster;
use crate::support::agent::{Agent, NODE, eventually, sdk::FromAddress};
use crate::support::fixtures::{pod, role};
use crate::support::kube;
use crate::support::upstream::{FakeImds, NODE_SECRET, TREE};

const POD_IP: &str = "127.0.1.10";

/// A cluster with one pod (role `app`) at [`POD_IP`], and an agent proxying to `upstream`.
async fn ec2(upstream: &FakeImds, extra: &[&str]) -> (Cluster, Agent) {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("app"));
    cluster.add_pod(&pod("p", POD_IP).role("app"));
    let url = upstream.url();
    let mut flags = vec!["--upstream-imds", url.as_str()];
    flags.extend_from_slice(extra);
    let agent = cluster.agent(&flags).await;
    (cluster, agent)
}

fn upstream_body(path: &str) -> &'static str {
    TREE.iter()
        .find(|(p, _)| *p == path)
        .map(|(_, b)| *b)
        .expect("in the tree")
}

/// Every target the upstream double was asked for, except token requests.
fn fetched(upstream: &FakeImds) -> Vec<String> {
    upstream
        .seen()
        .into_iter()
        .filter(|s| s.target != "/latest/api/token")
        .map(|s| s.target)
        .collect()
}

#[tokio::test]
async fn the_default_allow_list_is_proxied_verbatim_with_the_agents_own_token() {
    let upstream = FakeImds::start().await;
    let (_cluster, agent) = ec2(&upstream, &[]).await;
    let caller = agent.from(POD_IP);
    for path in [
        "meta-data/placement/region",
        "meta-data/placement/availability-zone",
        "meta-data/placement/availability-zone-id",
        "meta-data/instance-id",
        "meta-data/instance-type",
        "meta-data/local-hostname",
        "meta-data/hostname",
        "dynamic/instance-identity/document",
    ] {
        let reply = caller.get(&format!("/latest/{path}"), &[]).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}");
        assert_eq!(reply.text(), upstream_body(path), "{path}");
        assert_eq!(reply.headers["server"], "EC2ws");
        assert_eq!(reply.headers["content-type"], "text/plain");
    }
    // botocore asks for the zone with a trailing slash.
    let zone = caller.get("/latest/meta-data/placement/availability-zone/", &[]).await;
    assert_eq!(zone.text(), "eu-west-1b");
    let seen = upstream.seen();
    assert!(
        seen.iter()
            .all(|s| s.target == "/latest/api/token" || s.token.is_some())
    );
    assert_eq!(upstream.tokens_issued(), 1, "one token held for all requests");
}

#[tokio::test]
async fn everything_outside_the_allow_list_is_404_and_never_asked_upstream() {
    let upstream = FakeImds::start().await;
    let (_cluster, agent) = ec2(&upstream, &[]).await;
    let caller = agent.from(POD_IP);
    for path in [
        "/latest/user-data",
        "/latest/meta-data/local-ipv4",
        "/latest/meta-data/ami-id",
        "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
        "/latest/meta-data/spot/instance-action",
        "/latest/dynamic/instance-identity/pkcs7",
        "/latest/dynamic/instance-identity/signature",
        "/latest/meta-data/iam/security-credentials/node-role",
        "/latest/meta-data/nonexistent",
        "/2021-07-15/meta-data/placement/region",
    ] {
        let reply = caller.get(path, &[]).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{path}");
        assert!(reply.text().contains("404 - Not Found"));
    }
    assert_eq!(fetched(&upstream), Vec::<String>::new());
}

#[tokio::test]
async fn a_permissive_allow_list_still_cannot_reach_the_nodes_secrets() {
    let upstream = FakeImds::start().await;
    let (_cluster, agent) = ec2(&upstream, &["--allow-path", ".*"]).await;
    let caller = agent.from(POD_IP);
    assert_eq!(
        caller.get("/latest/meta-data/ami-id", &[]).await.text(),
        upstream_body("meta-data/ami-id")
    );
    for path in [
        "/latest/user-data",
        "/latest/meta-data/iam/security-credentials/node-role",
        "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
        "/latest/meta-data/identity-credentials/",
        "/latest/meta-data/spot/instance-action",
        "/latest/dynamic/instance-identity/pkcs7",
        "/latest/dynamic/instance-identity/rsa2048",
        "/latest/dynamic/instance-identity/signature",
    ] {
        let reply = caller.get(path, &[]).await;
        assert!(!reply.text().contains(NODE_SECRET), "{path}");
        assert_ne!(reply.status, StatusCode::OK, "{path}");
    }
    // The credential tree is always the pod's own, never the node's.
    let info = caller.get("/latest/meta-data/iam/info", &[]).await.json();
    assert!(
        info["InstanceProfileArn"]
            .as_str()
            .unwrap()
            .ends_with("instance-profile/app")
    );
    let listing = caller.get("/latest/meta-data/", &[]).await.text();
    for hidden in ["identity-credentials/", "spot/"] {
        assert!(!listing.lines().any(|l| l == hidden), "{listing}");
    }
    assert_eq!(
        caller.get("/latest/dynamic/instance-identity/", &[]).await.text(),
        "document"
    );
    for target in fetched(&upstream) {
        assert!(
            ![
                "/latest/user-data",
                "/latest/meta-data/iam",
                "/latest/meta-data/identity-credentials/ec2"
            ]
            .iter()
            .any(|denied| target.starts_with(denied)),
            "asked upstream for {target}"
        );
    }
}

#[tokio::test]
async fn listings_show_exactly_what_is_served() {
    let upstream = FakeImds::start().await;
    let (_cluster, agent) = ec2(&upstream, &[]).await;
    let caller = agent.from(POD_IP);
    let expected = [
        ("/latest/", "dynamic\nmeta-data"),
        (
            "/latest/meta-data/",
            "hostname\niam/\ninstance-id\ninstance-type\nlocal-hostname\nplacement/",
        ),
        (
            "/latest/meta-data/placement/",
            "availability-zone\navailability-zone-id\nregion",
        ),
        ("/latest/dynamic/", "instance-identity/"),
        ("/latest/dynamic/instance-identity/", "document"),
    ];
    for (path, listing) in expected {
        let reply = caller.get(path, &[]).await;
        assert_eq!(
            (reply.status, reply.text().as_str()),
            (StatusCode::OK, listing),
            "{path}"
        );
        // Every entry listed is served.
        for entry in listing.lines() {
            let child = format!("{path}{entry}");
            assert_eq!(caller.get(&child, &[]).await.status, StatusCode::OK, "{child}");
        }
    }
}

#[tokio::test]
async fn an_expired_upstream_token_is_replaced_once_and_answers_are_cached_briefly() {
    let upstream = FakeImds::start().await;
    let (_cluster, agent) = ec2(&upstream, &[]).await;
    let caller = agent.from(POD_IP);
    assert_eq!(
        caller.get("/latest/meta-data/placement/region", &[]).await.text(),
        "eu-west-1"
    );
    assert_eq!(
        caller.get("/latest/meta-data/placement/region", &[]).await.text(),
        "eu-west-1"
    );
    assert_eq!(fetched(&upstream), ["/latest/meta-data/placement/region"], "cached");
    upstream.revoke_tokens();
    let reply = caller.get("/latest/meta-data/instance-id", &[]).await;
    assert_eq!(reply.text(), upstream_body("meta-data/instance-id"));
    assert_eq!(upstream.tokens_issued(), 2);
}

#[tokio::test]
async fn an_unreachable_upstream_is_503_for_allowed_paths_and_404_for_the_rest() {
    let closed: SocketAddr = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let cluster = Cluster::start().await;
    cluster.add_pod(&pod("p", POD_IP));
    let url = format!("http://{closed}");
    let agent = cluster.agent(&["--upstream-imds", &url]).await;
    let caller = agent.from(POD_IP);
    let reply = caller.get("/latest/meta-data/placement/region", &[]).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(reply.text().contains("503 - Service Unavailable"));
    assert_eq!(caller.get("/latest/user-data", &[]).await.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn callers_that_are_not_pods_of_this_node_get_no_metadata() {
    let upstream = FakeImds::start().await;
    let (_cluster, agent) = ec2(&upstream, &["--pod-wait", "50ms"]).await;
    let reply = agent
        .from("127.0.1.99")
        .get("/latest/meta-data/placement/region", &[])
        .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(fetched(&upstream), Vec::<String>::new());
}

#[tokio::test]
async fn on_prem_metadata_is_synthesised_from_the_flags_and_the_node_name() {
    let cluster = Cluster::start().await;
    cluster.add_pod(&pod("p", POD_IP));
    let agent = cluster
        .agent(&["--upstream-imds", "none", "--availability-zone", "us-east-1c"])
        .await;
    let caller = agent.from(POD_IP);
    let text = |path: &'static str| async move {
        let reply = caller.get(path, &[]).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}");
        reply.text()
    };
    assert_eq!(text("/latest/meta-data/placement/region").await, "us-east-1");
    assert_eq!(
        text("/latest/meta-data/placement/availability-zone/").await,
        "us-east-1c"
    );
    assert_eq!(text("/latest/meta-data/local-hostname").await, "node-1");
    let id = text("/latest/meta-data/instance-id").await;
    assert!(id.len() == 19 && id.starts_with("i-"), "{id}");
    assert_eq!(
        text("/latest/meta-data/").await,
        "hostname\ninstance-id\nlocal-hostname\nplacement/"
    );
    let document = text("/latest/dynamic/instance-identity/document").await;
    assert!(document.starts_with("{\n  \""), "EC2's layout: {document}");
    let document: serde_json::Value = serde_json::from_str(&document).unwrap();
    assert_eq!(document["region"], "us-east-1");
    assert_eq!(document["availabilityZone"], "us-east-1c");
    assert_eq!(document["instanceId"], id.as_str());
    for absent in [
        "/latest/user-data",
        "/latest/meta-data/ami-id",
        "/latest/meta-data/placement/availability-zone-id",
    ] {
        assert_eq!(caller.get(absent, &[]).await.status, StatusCode::NOT_FOUND, "{absent}");
    }
}

async fn rust_sdk_region(agent: &Agent) -> Option<String> {
    let config = ProviderConfig::empty()
        .with_http_client(FromAddress(POD_IP.parse().unwrap()))
        .with_sleep_impl(TokioSleep::new());
    let client = imds::Client::builder()
        .endpoint(agent.url())
        .unwrap()
        .configure(&config)
        .build();
    ImdsRegionProvider::builder()
        .configure(&config)
        .imds_client(client)
        .build()
        .region()
        .await
        .map(|r| r.to_string())
}

#[tokio::test]
async fn the_rust_sdk_reads_its_region_in_both_modes() {
    let upstream = FakeImds::start().await;
    let (_cluster, agent) = ec2(&upstream, &[]).await;
    assert_eq!(rust_sdk_region(&agent).await.as_deref(), Some("eu-west-1"));

    let cluster = Cluster::start().await;
    cluster.add_pod(&pod("p", POD_IP));
    let agent = cluster.agent(&[]).await;
    assert_eq!(rust_sdk_region(&agent).await.as_deref(), Some("us-east-1"));
}

#[tokio::test]
async fn with_a_key_file_tokens_survive_a_restart_and_without_one_they_do_not() {
    let cluster = Cluster::start().await;
    cluster.add_pod(&pod("p", POD_IP));
    let dir = std::env::temp_dir().join(format!("imds-broker-key-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("token-key");
    std::fs::write(&key, [0x5a_u8; 48]).unwrap();
    let key = key.to_str().unwrap();
    let region = "/latest/meta-data/placement/region";

    let first = cluster.agent(&["--token-key-file", key, "--imdsv2", "required"]).await;
    let token = first.from(POD_IP).token("300").await.text();
    first.stop().await;
    let second = cluster.agent(&["--token-key-file", key, "--imdsv2", "required"]).await;
    let reply = second
        .from(POD_IP)
        .get(region, &[("x-aws-ec2-metadata-token", &token)])
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    second.stop().await;

    let third = cluster.agent(&["--imdsv2", "required"]).await;
    let reply = third
        .from(POD_IP)
        .get(region, &[("x-aws-ec2-metadata-token", &token)])
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    let _ = std::fs::remove_dir_all(dir);
}

/// Sends raw bytes from [`POD_IP`] and returns the status code and the whole answer.
async fn raw(agent: &Agent, request: &[u8]) -> (u16, String) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(POD_IP.parse().unwrap(), 0)).unwrap();
    let mut stream = socket.connect(agent.imds).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0; 4096];
        // Read until the server closes or the first answer is complete.
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
            let text = String::from_utf8_lossy(&answer);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length: ")
                            .map(str::to_owned)
                    })
                    .and_then(|l| l.trim().parse::<usize>().ok());
                if length.is_some_and(|l| body.len() >= l) {
                    break;
                }
            }
        }
    });
    read.await.expect("an answer in time");
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text:?}"));
    (status, text)
}

#[tokio::test]
async fn hostile_request_targets_get_a_defined_answer_on_the_wire() {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("app"));
    cluster.add_pod(&pod("p", POD_IP).role("app"));
    let agent = cluster.agent(&[]).await;
    let get = |target: &str| format!("GET {target} HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n").into_bytes();
    for target in [
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "/latest/meta-data/iam/security-credentials/?x",
        "/latest/meta-data/placement/region?/../../user-data",
        "/latest/meta-data/iam/security-credentials\\app",
        "/latest/meta-data/placement/%2e%2e/%2e%2e/user-data",
        "/latest/meta-data/placement/../../user-data",
    ] {
        let (status, text) = raw(&agent, &get(target)).await;
        assert_eq!(status, 400, "{target}: {text}");
        assert!(
            text.contains("Server: EC2ws") || text.contains("server: EC2ws"),
            "{target}: {text}"
        );
    }
    // Bytes the HTTP parser refuses before any routing: 400 and the connection closed.
    for request in [
        b"GET /latest/meta-data/iam/info\0 HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        b"GET /latest/meta-data/iam/in\x01fo HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        b"GET /latest/meta-data/iam/info HTTP/1.1\r\nHost: x\r\nX-A: a\0b\r\n\r\n".to_vec(),
    ] {
        let (status, text) = raw(&agent, &request).await;
        assert_eq!(status, 400, "{text}");
    }
    // Overlong: a target past the agent's 1 KiB limit is 414, up to the 80 KiB read buffer and past
    // the parser's own 64 KiB URI limit; headers over 16 KiB are 431; a head past the buffer is 431.
    for length in [2_000, 20_000, 70_000] {
        let long = format!("/latest/meta-data/{}", "a".repeat(length));
        let (status, text) = raw(&agent, &get(&long)).await;
        assert_eq!(status, 414, "a {length}-byte target: {text}");
    }
    let header = format!(
        "GET /latest/meta-data/iam/info HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "b".repeat(20_000)
    );
    assert_eq!(raw(&agent, header.as_bytes()).await.0, 431);
    let flood = format!(
        "GET /latest/meta-data/iam/info HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "b".repeat(100_000)
    );
    assert_eq!(raw(&agent, flood.as_bytes()).await.0, 431);
}

#[tokio::test]
async fn a_namespace_annotated_imdsv2_required_refuses_token_less_requests_from_its_pods() {
    let cluster = Cluster::start().await;
    cluster
        .kube
        .upsert_namespace("strict", &[("imds-broker.io/imdsv2", "required")]);
    cluster.kube.upsert_namespace("apps", &[]);
    cluster.add_pod(&kube::pod("strict", "s").ip("127.0.1.20"));
    cluster.add_pod(&pod("a", "127.0.1.21"));
    let agent = cluster.agent(&[]).await;
    let region = "/latest/meta-data/placement/region";
    let strict = agent.from("127.0.1.20");
    let reply = strict.get(region, &[]).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert!(reply.text().contains("401 - Unauthorized"));
    let token = strict.token("60").await.text();
    assert_eq!(
        strict.get(region, &[("x-aws-ec2-metadata-token", &token)]).await.status,
        StatusCode::OK
    );
    let other = agent.from("127.0.1.21");
    assert_eq!(other.get(region, &[]).await.status, StatusCode::OK);

    // The annotation takes effect while the agent runs.
    cluster
        .kube
        .upsert_namespace("apps", &[("imds-broker.io/imdsv2", "required")]);
    eventually("the apps namespace requires IMDSv2", || async {
        other.get(region, &[]).await.status == StatusCode::UNAUTHORIZED
    })
    .await;
}

/// Stores the agent's Node ([`NODE`]) with these labels and providerID, as the API server would.
fn label_node(cluster: &Cluster, labels: &[(&str, &str)], provider_id: Option<&str>) {
    let labels: serde_json::Map<String, serde_json::Value> =
        labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).into())).collect();
    cluster.kube.upsert(
        kube::Kind::Node,
        serde_json::json!({
            "metadata": { "name": NODE, "namespace": "", "labels": labels },
            "spec": { "providerID": provider_id },
        }),
    );
}

const EKS_LABELS: &[(&str, &str)] = &[
    ("topology.kubernetes.io/region", "eu-central-1"),
    ("topology.kubernetes.io/zone", "eu-central-1b"),
    ("topology.k8s.aws/zone-id", "euc1-az3"),
];

#[tokio::test]
async fn without_flags_region_zone_and_instance_come_from_the_nodes_labels() {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("app"));
    cluster.add_pod(&pod("p", POD_IP).role("app"));
    label_node(&cluster, EKS_LABELS, Some("aws:///eu-central-1b/i-0123456789abcdef0"));
    let agent = cluster.agent(&["--region", "", "--upstream-imds", "none"]).await;
    let caller = agent.from(POD_IP);
    let text = |path: &'static str| async move {
        let reply = caller.get(path, &[]).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}");
        reply.text()
    };
    assert_eq!(text("/latest/meta-data/placement/region").await, "eu-central-1");
    assert_eq!(text("/latest/meta-data/placement/region/").await, "eu-central-1");
    assert_eq!(
        text("/latest/meta-data/placement/availability-zone/").await,
        "eu-central-1b"
    );
    assert_eq!(
        text("/latest/meta-data/placement/availability-zone").await,
        "eu-central-1b"
    );
    assert_eq!(
        text("/latest/meta-data/placement/availability-zone-id").await,
        "euc1-az3"
    );
    assert_eq!(
        text("/latest/meta-data/placement/").await,
        "availability-zone\navailability-zone-id\nregion"
    );
    assert_eq!(text("/latest/meta-data/instance-id").await, "i-0123456789abcdef0");
    let document: serde_json::Value =
        serde_json::from_str(&text("/latest/dynamic/instance-identity/document").await).unwrap();
    assert_eq!(document["region"], "eu-central-1");
    assert_eq!(document["availabilityZone"], "eu-central-1b");
    assert_eq!(document["instanceId"], "i-0123456789abcdef0");
    assert_eq!(document["accountId"], "111111111111", "the account of the pod's role");
    assert_eq!(document["synthetic"], "true");
    assert_eq!(rust_sdk_region(&agent).await.as_deref(), Some("eu-central-1"));
    // The region also chose STS's endpoint; the double answers for every region, so credentials flow.
    let credentials = caller.get("/latest/meta-data/iam/security-credentials/app", &[]).await;
    assert_eq!(credentials.status, StatusCode::OK);
}

#[tokio::test]
async fn a_relabelled_node_is_answered_without_a_restart_and_flags_win_over_labels() {
    let cluster = Cluster::start().await;
    cluster.add_pod(&pod("p", POD_IP));
    label_node(&cluster, EKS_LABELS, None);
    let agent = cluster.agent(&["--region", "", "--upstream-imds", "none"]).await;
    let caller = agent.from(POD_IP);
    let zone = || async { caller.get("/latest/meta-data/placement/availability-zone", &[]).await };
    assert_eq!(zone().await.text(), "eu-central-1b");
    label_node(
        &cluster,
        &[
            ("topology.kubernetes.io/region", "eu-central-1"),
            ("topology.kubernetes.io/zone", "eu-central-1c"),
        ],
        None,
    );
    eventually("the new zone label served", || async {
        zone().await.text() == "eu-central-1c"
    })
    .await;
    let zone_id = caller
        .get("/latest/meta-data/placement/availability-zone-id", &[])
        .await;
    assert_eq!(zone_id.status, StatusCode::NOT_FOUND, "the label is gone, so is the id");
    // A zone label outside the region is no AWS zone: not served (botocore would cut a region from it).
    label_node(&cluster, &[("topology.kubernetes.io/zone", "rack-12")], None);
    eventually("the odd zone withdrawn", || async {
        zone().await.status == StatusCode::NOT_FOUND
    })
    .await;
    assert_eq!(
        caller.get("/latest/meta-data/placement/region", &[]).await.text(),
        "eu-central-1",
        "the region read at start stays"
    );

    let flagged = cluster
        .agent(&[
            "--region",
            "us-east-1",
            "--availability-zone",
            "us-east-1d",
            "--upstream-imds",
            "none",
        ])
        .await;
    let caller = flagged.from(POD_IP);
    // Flags never yield to the labels, so wait for what only the Node can change (the instance id,
    // from its providerID) to know the watch has delivered it, then check the flags still stand.
    label_node(&cluster, EKS_LABELS, Some("aws:///eu-central-1b/i-0fedcba9876543210"));
    eventually("the Node seen", || async {
        caller.get("/latest/meta-data/instance-id", &[]).await.text() == "i-0fedcba9876543210"
    })
    .await;
    assert_eq!(
        caller.get("/latest/meta-data/placement/region", &[]).await.text(),
        "us-east-1"
    );
    assert_eq!(
        caller
            .get("/latest/meta-data/placement/availability-zone", &[])
            .await
            .text(),
        "us-east-1d"
    );
    assert_eq!(
        caller
            .get("/latest/meta-data/placement/availability-zone-id", &[])
            .await
            .status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn no_region_flag_and_no_region_label_is_a_start_up_error_that_says_what_to_set() {
    let cluster = Cluster::start().await;
    let build = |cluster: &Cluster| {
        let config = crate::support::agent::config(&cluster.sts.url(), &["--region", ""]);
        let client = imds_broker::app::kube_client(::kube::Config::new(cluster.kube.url().parse().unwrap())).unwrap();
        imds_broker::app::App::build(config, client)
    };
    let Err(error) = build(&cluster).await else {
        panic!("built without a region")
    };
    let message = format!("{error:#}");
    assert!(message.contains("--region") && message.contains("404"), "{message}");

    label_node(&cluster, &[("topology.kubernetes.io/zone", "eu-west-1a")], None);
    let Err(error) = build(&cluster).await else {
        panic!("built without a region")
    };
    let message = format!("{error:#}");
    assert!(message.contains("topology.kubernetes.io/region"), "{message}");
}
