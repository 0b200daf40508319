//! The Rust SDK's side of the end-to-end matrix: run inside a pod's network namespace, it loads credentials
//! through aws-config's default chain (with nothing configured, only IMDS at 169.254.169.254 can answer),
//! then calls `GetCallerIdentity` at the STS endpoint named by `AWS_ENDPOINT_URL_STS` and prints one JSON
//! line: `{"arn", "account", "user_id"}` on success, `{"error", "no_credentials"}` on failure (exit 1).
//!
//! With `region` as its argument it prints `{"region"}` instead: the region aws-config's default chain
//! finds (run without AWS_REGION, only IMDS can answer).
//!
//! Plain HTTP is enough for both IMDS and the STS test double, so no TLS client is built.

use std::process::ExitCode;

use aws_config::BehaviorVersion;
use aws_credential_types::provider::ProvideCredentials;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("region") {
        let config = aws_config::defaults(BehaviorVersion::latest())
            .http_client(aws_smithy_http_client::Builder::new().build_http())
            .load()
            .await;
        let region = config.region().map(ToString::to_string);
        println!("{}", serde_json::json!({ "region": region }));
        return if region.is_some() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    match probe().await {
        Ok(identity) => {
            println!("{identity}");
            ExitCode::SUCCESS
        }
        Err((error, no_credentials)) => {
            println!(
                "{}",
                serde_json::json!({ "error": error, "no_credentials": no_credentials })
            );
            ExitCode::FAILURE
        }
    }
}

async fn probe() -> Result<serde_json::Value, (String, bool)> {
    let Ok(endpoint) = std::env::var("AWS_ENDPOINT_URL_STS") else {
        return Err(("AWS_ENDPOINT_URL_STS is not set".to_owned(), false));
    };
    let http = aws_smithy_http_client::Builder::new().build_http();
    // The region comes from AWS_REGION through the default chain, which shares this HTTP client; a
    // separately built region chain would have none and panic on its IMDS lookup.
    let config = aws_config::defaults(BehaviorVersion::latest())
        .http_client(http)
        .load()
        .await;
    let provider = config
        .credentials_provider()
        .ok_or_else(|| ("the default chain has no credentials provider".to_owned(), true))?;
    // Ask first, so "no credentials" is told apart from an STS failure.
    provider
        .provide_credentials()
        .await
        .map_err(|e| (format!("no credentials: {}", error_chain(&e)), true))?;
    let sts = aws_sdk_sts::Client::from_conf(
        aws_sdk_sts::config::Builder::from(&config)
            .endpoint_url(endpoint)
            .build(),
    );
    let identity = sts
        .get_caller_identity()
        .send()
        .await
        .map_err(|e| (format!("GetCallerIdentity: {}", error_chain(&e)), false))?;
    Ok(serde_json::json!({
        "arn": identity.arn(),
        "account": identity.account(),
        "user_id": identity.user_id(),
    }))
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
