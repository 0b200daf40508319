//! Federation commands, on the real binary: `trust-policy` prints a policy that the STS double, which
//! evaluates trust policies as IAM does, accepts for exactly the service accounts it names (through
//! the agent, end to end); `oidc export` writes the kube double's issuer documents for static hosting
//! and `--check` compares a published copy (a directory, and the same files served over HTTP) with the
//! live keys.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use http::StatusCode;
use http_body_util::Full;
use hyper::body::Bytes;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::support::fixtures::{ACCOUNT, role};
use crate::support::{Cluster, jwt, wire};

const CREDS: &str = "/latest/meta-data/iam/security-credentials/";

/// Runs the binary with `args` (and `KUBECONFIG` when given): (exit code, stdout, stderr).
async fn run(args: &[&str], kubeconfig: Option<&Path>) -> (i32, String, String) {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_imds-broker"));
    command.args(args).env_remove("KUBERNETES_SERVICE_HOST");
    if let Some(path) = kubeconfig {
        command.env("KUBECONFIG", path);
    }
    let output = command.output().await.expect("run imds-broker");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

async fn trust_policy(args: &[&str]) -> Value {
    let (code, stdout, stderr) = run(&[&["trust-policy"], args].concat(), None).await;
    assert_eq!(code, 0, "{stderr}");
    serde_json::from_str(&stdout).expect("the policy is JSON")
}

/// What the pod at `ip` gets for its role: the role document's `Code`.
async fn outcome(agent: &crate::support::agent::Agent, ip: &str, role_name: &str) -> String {
    let reply = agent.from(ip).get(&format!("{CREDS}{role_name}"), &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let document: Value = serde_json::from_str(&reply.text()).expect("a role document");
    document["Code"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_printed_trust_policy_lets_exactly_the_service_accounts_it_names_assume_the_role() {
    let cluster = Cluster::start().await;
    let issuer = cluster.kube.issuer();
    let common = ["--issuer", issuer.as_str(), "--account", ACCOUNT];
    let batch = trust_policy(&[&common[..], &["--namespace", "apps", "--service-account", "batch-*"]].concat()).await;
    assert!(batch["Statement"][0]["Condition"]["StringLike"].is_object(), "{batch}");
    cluster.sts.trust_policy(&role("batch"), batch);
    let api = trust_policy(&[&common[..], &["--namespace", "apps", "--service-account", "api"]].concat()).await;
    cluster.sts.trust_policy(&role("api"), api);
    let other_audience = trust_policy(
        &[
            &common[..],
            &[
                "--namespace",
                "apps",
                "--service-account",
                "api",
                "--audience",
                "elsewhere",
            ],
        ]
        .concat(),
    )
    .await;
    cluster.sts.trust_policy(&role("elsewhere"), other_audience);

    let cases = [
        ("127.0.9.1", "apps", "batch-1", "batch", "Success"),
        ("127.0.9.2", "apps", "batch-nightly", "batch", "Success"),
        ("127.0.9.3", "apps", "batchx", "batch", "AssumeRoleUnauthorizedAccess"),
        ("127.0.9.4", "jobs", "batch-1", "batch", "AssumeRoleUnauthorizedAccess"),
        ("127.0.9.5", "apps", "api", "api", "Success"),
        ("127.0.9.6", "apps", "api-2", "api", "AssumeRoleUnauthorizedAccess"),
        ("127.0.9.7", "apps", "api", "elsewhere", "AssumeRoleUnauthorizedAccess"),
    ];
    for (i, (ip, namespace, account, role_name, _)) in cases.iter().enumerate() {
        let fixture = crate::support::kube::pod(namespace, &format!("p{i}"))
            .ip(ip)
            .service_account(account)
            .role(role_name);
        cluster.add_pod(&fixture);
    }
    let agent = cluster.agent(&[]).await;
    for (ip, namespace, account, role_name, expected) in cases {
        assert_eq!(
            outcome(&agent, ip, role_name).await,
            expected,
            "{namespace}/{account} assuming {role_name}"
        );
    }
    agent.stop().await;
}

#[tokio::test]
async fn trust_policy_refuses_what_iam_would_refuse_naming_the_flag() {
    let (code, _, stderr) = run(
        &[
            "trust-policy",
            "--issuer",
            "http://plain.example.com",
            "--account",
            ACCOUNT,
            "--namespace",
            "a",
            "--service-account",
            "b",
        ],
        None,
    )
    .await;
    assert_eq!(code, 64);
    assert!(stderr.contains("--issuer"), "{stderr}");
    let (code, stdout, _) = run(
        &[
            "trust-policy",
            "--issuer",
            "https://oidc.example.com/id/X/",
            "--account",
            ACCOUNT,
            "--spiffe-id",
            "spiffe://example.org/w",
            "--provider-arn",
        ],
        None,
    )
    .await;
    assert_eq!(code, 0);
    assert_eq!(
        stdout.trim(),
        format!("arn:aws:iam::{ACCOUNT}:oidc-provider/oidc.example.com/id/X")
    );
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(format!("imds-broker-{tag}-{}", jwt::random_uid()));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Serves the files under `root` on a loopback port, as a bucket's website would (404 otherwise).
async fn serve(root: PathBuf) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(wire::serve(
        listener,
        None,
        move |request: http::Request<hyper::body::Incoming>| {
            let path = request.uri().path().to_owned();
            let file = root.join(path.trim_start_matches('/'));
            async move {
                match std::fs::read(&file) {
                    Ok(body) if !path.contains("..") => http::Response::new(Full::new(Bytes::from(body))),
                    _ => http::Response::builder()
                        .status(404)
                        .body(Full::new(Bytes::new()))
                        .unwrap(),
                }
            }
        },
    ));
    addr
}

#[tokio::test(flavor = "multi_thread")]
async fn oidc_export_writes_the_issuer_documents_for_hosting_and_check_names_the_keys_that_drifted() {
    let cluster = Cluster::start().await;
    let issuer = cluster.kube.issuer();
    let dir = TempDir::new("oidc");
    let kubeconfig = dir.0.join("kubeconfig");
    std::fs::write(&kubeconfig, cluster.kube.kubeconfig_yaml()).unwrap();
    let out = dir.0.join("site");
    let out_arg = out.to_string_lossy().into_owned();

    // Another public URL than the API server's issuer: refused, nothing written.
    let (code, _, stderr) = run(
        &[
            "oidc",
            "export",
            "--issuer-url",
            "https://oidc.example.com/prod",
            "--out",
            &out_arg,
        ],
        Some(&kubeconfig),
    )
    .await;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--service-account-issuer"), "{stderr}");
    assert!(!out.exists());

    let (code, stdout, stderr) = run(
        &["oidc", "export", "--issuer-url", &issuer, "--out", &out_arg],
        Some(&kubeconfig),
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("wrote"), "{stdout}");
    let discovery: Value =
        serde_json::from_slice(&std::fs::read(out.join(".well-known/openid-configuration")).unwrap()).unwrap();
    let jwks: Value = serde_json::from_slice(&std::fs::read(out.join("openid/v1/jwks")).unwrap()).unwrap();
    assert_eq!(discovery["issuer"], issuer.as_str());
    assert_eq!(
        discovery["jwks_uri"],
        format!("{issuer}/openid/v1/jwks"),
        "not the API server's own address"
    );
    assert_eq!(jwks, cluster.kube.jwks());

    // The copy, in its directory and served over HTTP, matches.
    let served = format!("http://{}/", serve(out.clone()).await);
    for location in [out_arg.as_str(), served.as_str()] {
        let (code, stdout, stderr) = run(&["oidc", "export", "--check", location], Some(&kubeconfig)).await;
        assert_eq!(code, 0, "{location}: {stderr}");
        assert!(stdout.contains("matches"), "{stdout}");
    }

    // Keys rotate: the published set still has the old key and lacks the new one.
    let live_kid = cluster.kube.signer().kid().to_owned();
    let stale = json!({ "keys": [{ "kty": "RSA", "kid": "retired-key", "alg": "RS256", "use": "sig", "n": "AQAB", "e": "AQAB" }] });
    std::fs::write(out.join("openid/v1/jwks"), serde_json::to_vec(&stale).unwrap()).unwrap();
    for location in [out_arg.as_str(), served.as_str()] {
        let (code, _, stderr) = run(&["oidc", "export", "--check", location], Some(&kubeconfig)).await;
        assert_eq!(code, 1, "{location}: {stderr}");
        assert!(stderr.contains(&format!("{live_kid:?} missing")), "{stderr}");
        assert!(stderr.contains("\"retired-key\" extra"), "{stderr}");
    }

    // Nothing published there at all: an error (2), not a difference.
    let (code, _, stderr) = run(
        &["oidc", "export", "--check", &format!("{served}nowhere")],
        Some(&kubeconfig),
    )
    .await;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("404"), "{stderr}");
}
