//! Following the API server: the agent keeps an exact picture of its node's pods through watch
//! breaks, history compaction (410 Gone) and pods of other nodes.

use http::StatusCode;

use crate::support::Cluster;
use crate::support::agent::eventually;
use crate::support::fixtures::{pod, role};

const CREDS: &str = "/latest/meta-data/iam/security-credentials/";

#[tokio::test]
async fn after_a_broken_watch_and_a_compaction_the_agent_relists_and_catches_up() {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("app"));
    cluster.add_pod(&pod("before", "127.0.0.80").role("app"));
    let agent = cluster.agent(&[]).await;
    assert_eq!(agent.from("127.0.0.80").get(CREDS, &[]).await.text(), "app");

    // The history the agent would resume from is gone: resuming gets 410 Gone and it must relist.
    cluster.kube.compact();
    cluster.kube.break_watches();
    cluster.kube.delete_pod("apps", "before");
    cluster.add_pod(&pod("after", "127.0.0.81").role("app"));

    let (before, after) = (agent.from("127.0.0.80"), agent.from("127.0.0.81"));
    eventually("the new pod is served", || async {
        after.get(CREDS, &[]).await.text() == "app"
    })
    .await;
    eventually("the deleted pod is forgotten", || async {
        before.get(CREDS, &[]).await.status == StatusCode::NOT_FOUND
    })
    .await;
    let metrics = agent.metrics().await;
    assert!(metrics.contains("imds_broker_pods_indexed 1"), "{metrics}");
}

#[tokio::test]
async fn pods_of_other_nodes_are_not_served() {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("app"));
    cluster.add_pod(&pod("elsewhere", "127.0.0.82").role("app").node(Some("node-2")));
    let agent = cluster.agent(&["--pod-wait", "50ms"]).await;
    assert_eq!(
        agent.from("127.0.0.82").get(CREDS, &[]).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(cluster.sts.calls(), 0);
}
