//! The Kubernetes API server and STS doubles as one standalone process, for shell and Python scripts
//! (the demo, the end-to-end suite, the benchmarks). Built with `cargo build --examples` as `doubles`.
//!
//! Owns only the command line and the process lifecycle; the doubles themselves are `jwt.rs`,
//! `kube.rs` and `sts.rs` beside this file, included by path. Runs until SIGTERM or SIGINT.
//!
//! ```text
//! doubles --kube-listen 127.0.0.1:0 --sts-listen 127.0.0.1:0 --kubeconfig-out /tmp/kc --ready-file /tmp/ready.json
//! ```
//! The ready file (written atomically once both listen) is `{"kube": url, "sts": url, "issuer": ...}`.
//! Control over HTTP: see `FakeKube` and `FakeSts` (`/_double/...` on each).
//!
//! `--spire-socket PATH` also starts the SPIRE agent double (`spire.rs`) there, with the entries of
//! `--spire-entry`, and the STS double then trusts the SPIRE OIDC discovery provider's keys and issuer
//! (read from its discovery document, as IAM reads them) instead of the kube double's; the ready file
//! adds `"spire_discovery": url`.

#[allow(dead_code)]
#[path = "jwt.rs"]
mod jwt;
#[allow(dead_code)]
#[path = "kube.rs"]
mod kube;
#[allow(dead_code)]
#[path = "spire.rs"]
mod spire;
#[allow(dead_code)]
#[path = "sts.rs"]
mod sts;
#[path = "wire.rs"]
mod wire;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde_json::json;

/// Kubernetes API server and AWS STS test doubles on loopback.
#[derive(Debug, Parser)]
#[command(name = "doubles")]
struct Args {
    /// Address of the Kubernetes API server double.
    #[arg(long, default_value = "127.0.0.1:0")]
    kube_listen: SocketAddr,
    /// Address of the STS double.
    #[arg(long, default_value = "127.0.0.1:0")]
    sts_listen: SocketAddr,
    /// Latency added to every AssumeRoleWithWebIdentity answer, in milliseconds.
    #[arg(long, default_value_t = 0)]
    sts_latency_ms: u64,
    /// The audience STS requires in tokens.
    #[arg(long, default_value = "sts.amazonaws.com")]
    sts_audience: String,
    /// Every valid token may assume any role.
    #[arg(long)]
    trust_all: bool,
    /// A trust rule `ROLE_ARN=SUB` (or just `ROLE_ARN` for any subject); repeatable.
    #[arg(long = "trust", value_name = "ROLE_ARN[=SUB]")]
    trust: Vec<String>,
    /// Write a kubeconfig for the Kubernetes double here (for KUBECONFIG).
    #[arg(long)]
    kubeconfig_out: Option<PathBuf>,
    /// Start the SPIRE agent double's Delegated Identity API on this Unix socket.
    #[arg(long)]
    spire_socket: Option<PathBuf>,
    /// A SPIRE registration entry `SELECTOR,SELECTOR=SPIFFE_ID` (e.g. `k8s:ns:a,k8s:sa:b=spiffe://example.org/ns/a/sa/b`).
    #[arg(long = "spire-entry", value_name = "SELECTORS=SPIFFE_ID")]
    spire_entries: Vec<String>,
    /// Write `{"kube": url, "sts": url}` here once both are listening.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

fn write_atomically(path: &Path, contents: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp-doubles");
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    for addr in [args.kube_listen, args.sts_listen] {
        anyhow::ensure!(addr.ip().is_loopback(), "{addr} is not a loopback address");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let kube = kube::FakeKube::start_on(args.kube_listen).await?;
    let spire = match &args.spire_socket {
        Some(path) => {
            let spire = spire::FakeSpire::start(path).await?;
            for entry in &args.spire_entries {
                let (selectors, id) = entry
                    .split_once('=')
                    .ok_or_else(|| anyhow::anyhow!("--spire-entry {entry:?} is not SELECTORS=SPIFFE_ID"))?;
                spire.register(&selectors.split(',').collect::<Vec<_>>(), id);
            }
            Some(spire)
        }
        None => None,
    };
    let (jwks, issuer) = match &spire {
        Some(spire) => {
            let (issuer, jwks) = spire::discover(&spire.discovery_url()).await;
            (jwks, issuer)
        }
        None => (kube.jwks(), kube.issuer()),
    };
    let sts = sts::FakeSts::start_on(args.sts_listen, &jwks, &issuer).await?;
    sts.set_latency(Duration::from_millis(args.sts_latency_ms));
    sts.set_audience(&args.sts_audience);
    sts.trust_all(args.trust_all);
    for rule in &args.trust {
        match rule.split_once('=') {
            Some((role, sub)) => sts.trust(role, sub),
            None => sts.trust_any(rule),
        }
    }
    if let Some(path) = &args.kubeconfig_out {
        write_atomically(path, &kube.kubeconfig_yaml())?;
    }
    let mut ready = json!({ "kube": kube.url(), "sts": sts.url(), "issuer": issuer });
    if let Some(spire) = &spire {
        ready["spire_discovery"] = json!(spire.discovery_url());
    }
    if let Some(path) = &args.ready_file {
        write_atomically(path, &ready.to_string())?;
    }
    println!("{ready}");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    eprintln!(
        "doubles: stopping (kube requests {}, token requests {}, sts calls {})",
        kube.request_count(),
        kube.token_request_count(),
        sts.calls()
    );
    Ok(())
}
