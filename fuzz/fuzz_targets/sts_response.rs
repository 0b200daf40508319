//! STS answers (`sts::Exchanger`): the body of an `AssumeRoleWithWebIdentity` response, through the
//! real SDK's deserializer and the agent's error classification, as if STS (or whatever answers on its
//! endpoint) had sent it.
//!
//! Input: a response body, answered once as a 200, once as a 400 and once as a 503 by an HTTP client
//! that never touches the network. Checks that nothing panics; that only a 200 yields credentials and
//! they never print their secrets; that a 5xx is never a final refusal; and that every error has a
//! closed kind and a code.

#![no_main]

use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpClient, SharedHttpConnector,
};
use aws_smithy_runtime_api::client::orchestrator::HttpRequest;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_runtime_api::http::{Response, StatusCode};
use aws_smithy_types::body::SdkBody;
use imds_broker::sts::{Config, Exchanger};
use imds_broker::workload::{RoleArn, Secret, Workload};
use libfuzzer_sys::fuzz_target;

/// What the next request is answered with: a status and a body.
static REPLY: Mutex<(u16, Vec<u8>)> = Mutex::new((200, Vec::new()));

/// Answers every request with [`REPLY`], at once.
#[derive(Debug, Clone, Copy)]
struct Canned;

impl HttpConnector for Canned {
    fn call(&self, _request: HttpRequest) -> HttpConnectorFuture {
        let (status, body) = REPLY.lock().expect("reply lock").clone();
        let status = StatusCode::try_from(status).expect("a valid status");
        HttpConnectorFuture::ready(Ok(Response::new(status, SdkBody::from(body))))
    }
}

impl HttpClient for Canned {
    fn http_connector(&self, _: &HttpConnectorSettings, _: &RuntimeComponents) -> SharedHttpConnector {
        SharedHttpConnector::new(*self)
    }
}

struct Harness {
    runtime: tokio::runtime::Runtime,
    exchanger: Exchanger,
    role: RoleArn,
    workload: Workload,
    sa_token: Secret,
}

static HARNESS: LazyLock<Harness> = LazyLock::new(|| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime");
    let config = Config {
        endpoint: None,
        session_duration: Duration::from_secs(3600),
    };
    // The SDK builds its client inside a runtime (its default sleep is tokio's).
    let exchanger = runtime.block_on(async { Exchanger::with_http_client(&config, "us-east-1", SharedHttpClient::new(Canned)) });
    Harness {
        runtime,
        exchanger,
        role: RoleArn::parse("arn:aws:iam::111111111111:role/app").expect("valid"),
        workload: Workload {
            uid: "uid".into(),
            namespace: "apps".into(),
            name: "app-7d9f".into(),
            service_account: "default".into(),
            pod_role: None,
            service_account_role: None,
            service_account_unreadable: false,
            running_since: None,
            ips: Vec::new(),
            running: true,
            terminating: false,
            host_network: false,
        },
        sa_token: Secret::new("eyJhbGciOiJSUzI1NiJ9.fuzz.signature"),
    }
});

fuzz_target!(|body: &[u8]| {
    let h = &*HARNESS;
    for status in [200, 400, 503] {
        *REPLY.lock().expect("reply lock") = (status, body.to_vec());
        let result = h
            .runtime
            .block_on(h.exchanger.exchange(&h.role, &h.workload, &h.sa_token));
        match result {
            Ok(creds) => {
                assert_eq!(status, 200, "credentials from a {status}");
                let debug = format!("{creds:?}");
                let redacted = format!(
                    "Credentials {{ access_key_id: {:?}, expiration: {:?}, .. }}",
                    creds.access_key_id, creds.expiration
                );
                assert_eq!(debug, redacted);
            }
            Err(error) => {
                if status >= 500 {
                    assert!(error.is_transient(), "a {status} is final: {error}");
                }
                let _ = (error.kind(), error.code(), error.to_string());
            }
        }
    }
});
