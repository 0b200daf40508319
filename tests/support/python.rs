//! Runs the Python side of the suite (real botocore, moto's server) from the virtualenv that the test
//! command (`tests/run.sh`) creates at `.venv`, or from `IMDS_BROKER_TEST_PYTHON`.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

/// The interpreter with boto3 and moto installed.
pub fn interpreter() -> PathBuf {
    if let Ok(python) = std::env::var("IMDS_BROKER_TEST_PYTHON") {
        return python.into();
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        venv.exists(),
        "{} is missing: run tests/run.sh once (it creates the virtualenv with boto3 and moto)",
        venv.display()
    );
    venv
}

/// Runs `script` (relative to the repository) with `env` and parses its stdout as JSON.
pub async fn run(script: &str, env: &[(&str, &str)]) -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(script);
    let mut command = Command::new(interpreter());
    command.arg(path).stdin(Stdio::null()).kill_on_drop(true);
    // Nothing from the developer's environment may give the SDK other credentials.
    for var in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
    ] {
        command.env_remove(var);
    }
    command
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null");
    for (key, value) in env {
        command.env(key, value);
    }
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("probe finishes within 60s")
        .expect("probe starts");
    assert!(
        output.status.success(),
        "{script} failed: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "{script} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

/// moto's server, as a process on a loopback port.
pub struct Moto {
    pub url: String,
    _child: Child,
}

impl Moto {
    /// Starts `moto.server` and waits (bounded) until it answers.
    pub async fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(interpreter())
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("moto starts");
        let url = format!("http://127.0.0.1:{port}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "moto did not listen within 30s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self { url, _child: child }
    }
}
