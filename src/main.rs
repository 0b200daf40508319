//! The `imds-broker` binary: parse flags, start logging, build the agent, run it until a signal.

use std::process::ExitCode;

use clap::Parser;
use imds_broker::app::App;
use imds_broker::config::{Cli, Command, IptablesAction, OidcAction, OidcExportArgs, TrustPolicyArgs};
use imds_broker::federation::{oidc, trust_policy};
use imds_broker::{netfilter, shutdown, telemetry};

/// Exit code for a configuration the agent cannot run with (sysexits' EX_USAGE).
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    harden();
    let cli = Cli::parse();
    if let Some(command) = cli.command {
        return maintenance(command);
    }
    let args = cli.run;
    let config = match args.config() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("imds-broker: invalid configuration: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Err(error) = telemetry::init(args.log_format, &args.log) {
        eprintln!("imds-broker: invalid --log filter {:?}: {error}", args.log);
        return ExitCode::from(EXIT_CONFIG);
    }
    // Before the runtime's threads exist: the arena limit applies to threads created after it.
    heap::keep_small(args.heap_trim_interval);
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    let result = runtime.block_on(async {
        let shutdown = shutdown::on_signals()?;
        let kube_config = kube::Config::infer()
            .await
            .map_err(|e| anyhow::anyhow!("no Kubernetes configuration (in-cluster or KUBECONFIG): {e}"))?;
        let client = imds_broker::app::kube_client(kube_config)
            .map_err(|e| anyhow::anyhow!("cannot build the Kubernetes client: {e}"))?;
        App::build(config, client).await?.run(shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("imds-broker: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// `iptables reconcile`: keeps the capture in place and vouches for it until a signal; the rules stay
/// when it stops (pods fail closed), only the vouching is withdrawn.
fn reconcile(args: &imds_broker::config::ReconcileArgs) -> ExitCode {
    let config = match args.config() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("imds-broker: invalid configuration: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Err(error) = telemetry::init(telemetry::LogFormat::Text, "info") {
        eprintln!("imds-broker: cannot start logging: {error}");
        return ExitCode::FAILURE;
    }
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    let result = runtime.block_on(async {
        let shutdown = shutdown::on_signals()?;
        let registry = imds_broker::metrics::registry()?;
        let valid_for = config.reconcile_interval * 3;
        let reconciler = netfilter::Reconciler::build(config, netfilter::System, &registry)?;
        let (installed_tx, installed) = tokio::sync::watch::channel(false);
        let admin = match args.metrics_listen {
            Some(address) => Some(admin(address, &registry, installed.clone(), shutdown.clone()).await?),
            None => None,
        };
        tokio::join!(
            reconciler.run(installed_tx, shutdown.clone()),
            netfilter::status::vouch(installed, args.status_file.clone(), valid_for, shutdown.clone()),
        );
        if let Some(task) = admin {
            task.await?;
        }
        anyhow::Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("imds-broker: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// `iptables reconcile --metrics-listen`: the reconcile counters, and ready while the capture is in
/// place, for Prometheus and probes; stops with `shutdown`.
async fn admin(
    address: std::net::SocketAddr,
    registry: &prometheus::Registry,
    installed: tokio::sync::watch::Receiver<bool>,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use anyhow::Context;
    use imds_broker::server::{self, admin, connections};
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("binding --metrics-listen {address}"))?;
    let handler = std::sync::Arc::new(admin::Handler {
        registry: registry.clone(),
        ready: vec![installed],
        metrics: admin::Metrics::register(registry)?,
    });
    Ok(tokio::spawn(server::serve(
        listener,
        move |_, request| {
            let handler = handler.clone();
            async move { handler.handle(request.uri().path()) }
        },
        connections::Limits::new(connections::Config { total: 64, per_ip: 16 }, None),
        shutdown,
        std::time::Duration::from_secs(1),
    )))
}

/// The multi-threaded runtime, or `None` (said on stderr) when it cannot start.
fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => Some(runtime),
        Err(error) => {
            eprintln!("imds-broker: cannot start the async runtime: {error}");
            None
        }
    }
}

/// Keeps secrets out of core dumps and away from other processes of the same user: no core files
/// (RLIMIT_CORE 0), and not dumpable, so neither a crash nor `ptrace` or `/proc/<pid>/mem` by another
/// process of our user reaches cached credentials or the IMDSv2 token key. Done first, before any
/// secret is in memory.
fn harden() {
    use nix::sys::resource::{Resource, setrlimit};
    if let Err(error) = setrlimit(Resource::RLIMIT_CORE, 0, 0) {
        eprintln!("imds-broker: warning: cannot turn core dumps off: {error}");
    }
    if let Err(error) = nix::sys::prctl::set_dumpable(false) {
        eprintln!("imds-broker: warning: cannot mark the process non-dumpable: {error}");
    }
}

/// `trust-policy`: prints the policy (or the provider's ARN).
fn print_trust_policy(args: &TrustPolicyArgs) -> ExitCode {
    let request = args.request();
    let printed = if args.provider_arn {
        trust_policy::provider_arn(&request)
    } else {
        trust_policy::policy(&request).map(|policy| serde_json::to_string_pretty(&policy).unwrap_or_default())
    };
    match printed {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("imds-broker: {error}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// `oidc export`: writes the documents for publication, or checks a published copy (exit 1 when it
/// differs, 2 when something could not be read or written).
fn oidc_export(args: &OidcExportArgs) -> ExitCode {
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    let result = runtime.block_on(async {
        let kube_config = kube::Config::infer()
            .await
            .map_err(|e| anyhow::anyhow!("no Kubernetes configuration (in-cluster or KUBECONFIG): {e}"))?;
        let client = imds_broker::app::kube_client(kube_config)
            .map_err(|e| anyhow::anyhow!("cannot build the Kubernetes client: {e}"))?;
        let live = oidc::live(&client).await?;
        if let Some(location) = &args.check {
            let drift = oidc::drift(&live, &oidc::published(location).await?);
            if drift.is_empty() {
                println!(
                    "imds-broker: {location} matches the API server ({} keys)",
                    live.keys().len()
                );
                return anyhow::Ok(true);
            }
            eprint!("imds-broker: {location} differs from the API server:\n{drift}");
            return Ok(false);
        }
        let (Some(issuer_url), Some(out)) = (&args.issuer_url, &args.out) else {
            anyhow::bail!("--issuer-url and --out are required without --check");
        };
        let documents = oidc::for_publication(&live, issuer_url)?;
        for path in oidc::write(&documents, out)? {
            println!("imds-broker: wrote {}", path.display());
        }
        println!(
            "imds-broker: {} keys; publish {} so that {issuer_url}/{} and {issuer_url}/{} are served",
            live.keys().len(),
            out.display(),
            oidc::DISCOVERY_PATH,
            oidc::JWKS_PATH
        );
        Ok(true)
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("imds-broker: {error:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs a maintenance command.
fn maintenance(command: Command) -> ExitCode {
    match command {
        Command::TrustPolicy(args) => print_trust_policy(&args),
        Command::Oidc {
            action: OidcAction::Export(args),
        } => oidc_export(&args),
        Command::Iptables {
            action: IptablesAction::Reconcile(args),
        } => reconcile(&args),
        Command::Iptables {
            action: IptablesAction::Uninstall,
        } => match netfilter::uninstall(&netfilter::System) {
            Ok(removed) => {
                println!(
                    "imds-broker: removed chain {} and {} PREROUTING jump(s) from {:?}",
                    netfilter::CHAIN,
                    removed.jumps,
                    removed.families
                );
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("imds-broker: iptables uninstall failed: {error}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Keeping the heap's resident size close to what is live (glibc's allocator only; elsewhere nothing).
///
/// glibc gives each thread that contends for the heap an arena of its own (up to eight per core) and
/// returns freed memory to the kernel only from the top of each arena. An agent that parses a relist of
/// pods, or answers a burst of first requests, keeps the pages those freed objects held, in every arena
/// the runtime's threads touched. Two arenas bound that spread (the runtime has one worker per core,
/// and nearly every request is a cache hit that allocates little), and `malloc_trim(0)` every
/// `--heap-trim-interval` hands the free pages inside them back (`madvise(MADV_DONTNEED)`), so an idle
/// agent's RSS follows its live data instead of its peak. One trim walks the free lists while holding
/// each arena's lock in turn: tens of microseconds for this heap, once per interval.
mod heap {
    use std::time::Duration;

    /// Limits the arenas and starts the trimming thread, unless `interval` is zero.
    pub fn keep_small(interval: Duration) {
        if interval.is_zero() {
            return;
        }
        limit_arenas();
        let spawned = std::thread::Builder::new()
            .name("heap-trim".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                loop {
                    std::thread::sleep(interval);
                    trim();
                }
            });
        if let Err(error) = spawned {
            eprintln!("imds-broker: warning: cannot start the heap trimming thread: {error}");
        }
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn limit_arenas() {
        // SAFETY: mallopt only sets an allocator parameter; called before the runtime's threads start.
        let ok = unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
        if ok != 1 {
            eprintln!("imds-broker: warning: mallopt(M_ARENA_MAX) refused");
        }
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn trim() {
        // SAFETY: malloc_trim is thread-safe (it takes each arena's lock) and touches no Rust object.
        unsafe {
            libc::malloc_trim(0);
        }
    }

    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    fn limit_arenas() {}

    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    fn trim() {}
}
