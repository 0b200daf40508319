//! The same flow with moto's server as STS: what the agent hands out works at a real STS
//! implementation, which names the assumed role and the pod's session.

use aws_sdk_sts::config::{BehaviorVersion, Region};
use http::StatusCode;

use crate::support::Cluster;
use crate::support::fixtures::{ACCOUNT, pod};
use crate::support::python::Moto;

#[tokio::test]
async fn credentials_from_moto_identify_the_pods_role_and_session() {
    let moto = Moto::start().await;
    let cluster = Cluster::start().await;
    cluster.add_pod(&pod("billing-0", "127.0.0.60").role("billing"));
    cluster.add_pod(&pod("search-0", "127.0.0.61").role("search"));
    let agent = cluster.agent_with_sts(&moto.url, &[]).await;

    for (source, role_name, session) in [
        ("127.0.0.60", "billing", "apps.billing-0"),
        ("127.0.0.61", "search", "apps.search-0"),
    ] {
        let reply = agent
            .from(source)
            .get(&format!("/latest/meta-data/iam/security-credentials/{role_name}"), &[])
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        let doc = reply.json();
        let credentials = aws_credential_types::Credentials::new(
            doc["AccessKeyId"].as_str().unwrap(),
            doc["SecretAccessKey"].as_str().unwrap(),
            Some(doc["Token"].as_str().unwrap().to_owned()),
            None,
            "imds-broker",
        );
        let config = aws_sdk_sts::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url(&moto.url)
            .credentials_provider(credentials)
            .http_client(aws_smithy_http_client::Builder::new().build_http())
            .build();
        let identity = aws_sdk_sts::Client::from_conf(config)
            .get_caller_identity()
            .send()
            .await
            .unwrap();
        assert_eq!(
            identity.arn().unwrap(),
            format!("arn:aws:sts::{ACCOUNT}:assumed-role/{role_name}/{session}")
        );
        assert_eq!(identity.account().unwrap(), ACCOUNT);
    }
}
