//! The imds-broker benchmark (issue #5): serving speed against a same-machine ceiling, memory by pod
//! count, memory and API-server cost by the size of the rest of the cluster (issue #13), time to a
//! pod's first credential, upstream load in steady state, and a burst of pods.
//!
//! `cargo bench --bench imds` (via `bench/run.sh`) runs everything at full size in the release profile
//! and rewrites `bench/RESULTS.md`. `cargo test --bench imds -- --smoke` (via `bench/smoke.sh`) runs the
//! same scenarios with tiny counts in the dev profile, writes `target/bench-logs/SMOKE.md` and fails only
//! if a scenario produced no numbers. `--profile` records a `perf` profile of the agent serving reads
//! (`target/bench-logs/perf.data`). `--serve-ceiling <bytes>` is internal: the ceiling process.
//!
//! Not a libtest bench (`harness = false`): it needs child processes, wall-clock windows and one report.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]
// Benchmarks measure wall-clock time and never run on a paused clock.
#![allow(clippy::disallowed_types)]

mod agent;
mod ceiling;
mod fleet;
mod load;
mod pods;
mod report;
mod scenarios;

/// The wire-level doubles shared with the integration tests.
#[path = "../tests/support"]
#[allow(dead_code)]
mod support {
    pub mod client;
    pub mod jwt;
    pub mod kube;
    pub mod sts;
    pub mod wire;
}

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use scenarios::Sizes;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(i) = args.iter().position(|a| a == ceiling::FLAG) {
        let len = args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .expect("--serve-ceiling <bytes>");
        ceiling::serve(len);
        return ExitCode::SUCCESS;
    }
    let smoke = args.iter().any(|a| a == "--smoke");
    let profile = args.iter().any(|a| a == "--profile");
    let sizes = if smoke { Sizes::smoke() } else { Sizes::full() };
    // The load generator and the doubles get two workers, as many as the agent and the ceiling have.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime starts");
    if profile {
        runtime.block_on(scenarios::profile(64, 10));
        return ExitCode::SUCCESS;
    }
    let started = Instant::now();
    let results = runtime.block_on(async {
        eprintln!("imds-broker bench ({}):", if smoke { "smoke" } else { "full" });
        let serving = scenarios::serving(&sizes).await;
        let memory = scenarios::memory(&sizes).await;
        let cluster = scenarios::cluster(&sizes).await;
        let first = scenarios::first_credential(&sizes).await;
        let upstream = scenarios::upstream(&sizes).await;
        let bursts = scenarios::burst(&sizes).await;
        report::Results {
            sizes: sizes.clone(),
            smoke,
            serving,
            memory,
            cluster,
            first,
            upstream,
            bursts,
            elapsed: started.elapsed(),
        }
    });
    // Child processes are gone by now; the runtime's own tasks (the doubles) end with it.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));

    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = if smoke {
        root.join("target/bench-logs/SMOKE.md")
    } else {
        root.join("bench/RESULTS.md")
    };
    let markdown = results.markdown();
    std::fs::write(&out, &markdown).expect("write the results");
    eprintln!("wrote {}", out.display());
    let missing = report::missing_numbers(&results);
    if missing.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("the bench produced no numbers for: {}", missing.join(", "));
        ExitCode::FAILURE
    }
}
