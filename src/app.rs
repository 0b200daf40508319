//! The composition root: builds every component from the [`Config`], binds the listeners, and runs the
//! long-lived tasks until shutdown, stopping them in order (not ready → stop accepting → drain → stop
//! watching).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::credentials::Cache;
use crate::metadata::{self, Metadata};
use crate::pods::Store;
use crate::server::admin;
use crate::server::imds;
use crate::server::imds_token::Issuer;
use crate::spire::{self, IdentitySource};
use crate::{credentials, events, namespaces, netfilter, node_taint, pods, sa_token, server, sts, watch};

/// A built, not yet running agent.
pub struct App {
    config: Config,
    imds_listener: TcpListener,
    admin_listener: TcpListener,
    registry: Registry,
    store: Store,
    cache: Cache,
    imds: Arc<imds::Handler>,
    watcher: pods::watch::Watcher,
    namespace_watcher: namespaces::Watcher,
    placement_watcher: Option<metadata::placement::Watcher>,
    events: mpsc::Receiver<pods::Event>,
    netfilter: Option<netfilter::Reconciler<netfilter::System>>,
    connections: server::connections::Limits,
    startup_taint: Option<node_taint::Remover>,
    recorder: Option<events::Recorder>,
    admin_metrics: admin::Metrics,
}

/// The Kubernetes client the agent needs: kube's own retries of 429/503/504 (exponential, for minutes)
/// are off, because every caller bounds and retries on its own terms — the watches with a short capped
/// backoff, so pods are seen within seconds of an outage's end; TokenRequest through the cache's
/// per-pod backoff, so a throttling API server is not hammered.
pub fn kube_client(mut config: kube::Config) -> kube::Result<kube::Client> {
    config.default_retry = false;
    kube::Client::try_from(config)
}

impl App {
    /// Builds the agent: binds both listeners, builds the clients, registers metrics.
    pub async fn build(config: Config, client: kube::Client) -> anyhow::Result<Self> {
        let imds_listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding the IMDS endpoint on {}", config.listen))?;
        let admin_listener = TcpListener::bind(config.metrics_listen)
            .await
            .with_context(|| format!("binding the admin endpoint on {}", config.metrics_listen))?;
        let registry = crate::metrics::registry()?;
        // The STS region is fixed for the agent's life: from the flag, else the Node's label, now.
        let node_placement = match &config.region {
            Some(_) => metadata::Placement::default(),
            None => metadata::placement::read_node(&client, &config.node_name)
                .await
                .context("no --region given, so the region comes from this node's labels")?,
        };
        let region = config
            .region
            .clone()
            .or_else(|| node_placement.region.clone())
            .with_context(|| {
                format!(
                    "no --region given, and Node {} has no {} label: set one of them",
                    config.node_name,
                    metadata::placement::REGION_LABEL
                )
            })?;
        let boot_time = match pods::boot_time() {
            Ok(boot_time) => Some(boot_time),
            Err(error) => {
                tracing::warn!(%error, "cannot read the node's boot time from /proc/stat; pods from before a reboot cannot be told apart");
                None
            }
        };
        // hostNetwork pods are indexed (by UID only) just for the container-credentials endpoint.
        let store = Store::new(boot_time, config.container_credentials.is_some());
        let (events_tx, events) = mpsc::channel(1024);
        let watch_metrics = watch::Metrics::register(&registry)?;
        let watcher = pods::watch::Watcher {
            client: client.clone(),
            node_name: config.node_name.clone(),
            store: store.clone(),
            events: events_tx,
            metrics: pods::watch::Metrics::register(&registry)?,
            watch_config: config.watch.clone(),
            watch_metrics: watch_metrics.clone(),
        };
        let (event_sink, recorder) = events::build(&config.events, client.clone(), &registry)?;
        let cache = Cache::new(
            config.credentials.clone(),
            match &config.spire {
                Some(spire) => IdentitySource::Spire(spire::Client::new(spire.clone())),
                None => IdentitySource::Kubernetes(sa_token::Minter::new(client.clone(), config.sa_token.clone())),
            },
            sts::Exchanger::new(&config.sts, &region),
            config.roles.clone(),
            store.clone(),
            credentials::Metrics::register(&registry)?,
            event_sink,
        );
        let imds_tokens = match &config.token_key_file {
            Some(path) => {
                let secret =
                    std::fs::read(path).with_context(|| format!("reading --token-key-file {}", path.display()))?;
                Issuer::from_secret(&secret).with_context(|| {
                    format!(
                        "--token-key-file {}: needs at least {} bytes",
                        path.display(),
                        Issuer::MIN_SECRET
                    )
                })?
            }
            None => {
                tracing::warn!("no --token-key-file: IMDSv2 tokens will not survive a restart of this agent");
                Issuer::random()
            }
        };
        let (placement_tx, placement) =
            metadata::placement::Watcher::channel(&config.metadata.flags, &node_placement, &region);
        let metadata = Metadata::build(config.metadata.clone(), placement).await;
        // Only synthesised answers follow the Node; upstream, EC2's own IMDS knows where it is.
        let placement_watcher = metadata.is_synthetic().then(|| metadata::placement::Watcher {
            client: client.clone(),
            node_name: config.node_name.clone(),
            flags: config.metadata.flags.clone(),
            region: region.clone(),
            out: placement_tx,
            watch_config: config.watch.clone(),
            watch_metrics: watch_metrics.clone(),
        });
        let namespace_policy = namespaces::Policy::new();
        let namespace_watcher = namespaces::Watcher {
            client: client.clone(),
            policy: namespace_policy.clone(),
            watch_config: config.watch.clone(),
            watch_metrics,
        };
        let imds = Arc::new(imds::Handler {
            config: config.imds.clone(),
            store: store.clone(),
            cache: cache.clone(),
            imds_tokens,
            metrics: imds::Metrics::register(&registry)?,
            refusal_log: server::refusal_log::Limiter::register(&registry)?,
            metadata,
            namespaces: namespace_policy,
            container: config
                .container_credentials
                .clone()
                .map(|c| server::container::Endpoint::new(c, config.node_name.clone(), client.clone(), &registry))
                .transpose()?,
        });
        let netfilter = config
            .netfilter
            .clone()
            .map(|c| netfilter::Reconciler::build(c, netfilter::System, &registry))
            .transpose()?;
        if netfilter.is_none() {
            // Zero, so dashboards and rules find the series without --iptables too (the split
            // DaemonSet's capture container serves its own, `iptables reconcile --metrics-listen`).
            netfilter::Metrics::register(&registry)?;
        }
        let connections = server::connections::Limits::new(
            config.connections,
            Some(server::connections::Metrics::register(&registry)?),
        );
        let startup_taint = config.startup_taint.clone().map(|key| node_taint::Remover {
            client: client.clone(),
            node_name: config.node_name.clone(),
            key,
        });
        let admin_metrics = admin::Metrics::register(&registry)?;
        Ok(Self {
            config,
            imds_listener,
            admin_listener,
            registry,
            store,
            cache,
            imds,
            watcher,
            namespace_watcher,
            placement_watcher,
            events,
            netfilter,
            connections,
            startup_taint,
            recorder,
            admin_metrics,
        })
    }

    /// Where the IMDS endpoint listens (useful with port 0).
    pub fn imds_addr(&self) -> SocketAddr {
        self.imds_listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Where the admin endpoint listens.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Runs until `shutdown` is cancelled, then drains and returns.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let (ready_tx, ready) = tokio::sync::watch::channel(false);
        let grace = self.config.shutdown_grace;
        tracing::info!(
            imds = %self.imds_addr(), admin = %self.admin_addr(), node = %self.config.node_name,
            imdsv2 = ?self.config.imds.imdsv2, "imds-broker starting"
        );

        // Background work stops after the servers have drained, so in-flight requests can still be
        // answered from the cache and the index.
        let background = CancellationToken::new();
        let watch_task = tokio::spawn(self.watcher.run(background.clone()));
        let namespace_task = tokio::spawn(self.namespace_watcher.run(background.clone()));
        let placement_task = self.placement_watcher.map(|w| tokio::spawn(w.run(background.clone())));
        let cache_task = tokio::spawn(self.cache.run(self.events, ready_tx.clone(), background.clone()));
        let events_task = self.recorder.map(|r| tokio::spawn(r.run(background.clone())));
        // The capture rules are never removed here: while the agent is down pods must be refused, not
        // reach the node's own metadata service.
        // With --iptables, readiness also waits for the capture rule: before it exists, pods would reach
        // the node's own metadata service.
        // Readiness also follows the view: not ready while pods, service accounts or namespaces are
        // being relisted after missed events.
        let mut ready = vec![ready, self.store.whole(), self.imds.namespaces.synced()];
        // Split DaemonSet: the capture container vouches for the rules in a file; follow it.
        let status_task = self.config.capture_status_file.clone().map(|path| {
            let (holds_tx, holds) = tokio::sync::watch::channel(false);
            ready.push(holds);
            tokio::spawn(netfilter::status::follow(path, holds_tx, background.clone()))
        });
        let netfilter_task = self.netfilter.map(|n| {
            let (installed_tx, installed) = tokio::sync::watch::channel(false);
            ready.push(installed);
            tokio::spawn(n.run(installed_tx, background.clone()))
        });

        // The startup taint comes off once everything /readyz waits for is in place.
        let taint_task = self
            .startup_taint
            .map(|remover| tokio::spawn(remover.run(ready.clone(), background.clone())));

        let imds = self.imds.clone();
        let imds_task = tokio::spawn(server::serve(
            self.imds_listener,
            move |peer, request| imds.clone().handle(peer.ip(), request),
            self.connections,
            shutdown.clone(),
            grace,
        ));
        let admin = Arc::new(admin::Handler {
            registry: self.registry,
            ready,
            metrics: self.admin_metrics,
        });
        // The admin endpoint outlives the IMDS drain so probes see "not ready" rather than a refusal.
        let admin_shutdown = CancellationToken::new();
        let admin_task = tokio::spawn(server::serve(
            self.admin_listener,
            move |_, request| {
                let admin = admin.clone();
                async move { admin.handle(request.uri().path()) }
            },
            // Probes and scrapes come from the kubelet and Prometheus: a small fixed budget.
            server::connections::Limits::new(server::connections::Config { total: 64, per_ip: 16 }, None),
            admin_shutdown.clone(),
            grace,
        ));

        shutdown.cancelled().await;
        ready_tx.send_replace(false);
        imds_task.await.context("IMDS server task")?;
        admin_shutdown.cancel();
        admin_task.await.context("admin server task")?;
        background.cancel();
        watch_task.await.context("pod watch task")?;
        namespace_task.await.context("namespace watch task")?;
        if let Some(task) = placement_task {
            task.await.context("node placement watch task")?;
        }
        cache_task.await.context("credential cache task")?;
        if let Some(task) = events_task {
            task.await.context("pod events task")?;
        }
        if let Some(task) = netfilter_task {
            task.await.context("iptables reconcile task")?;
        }
        if let Some(task) = status_task {
            task.await.context("capture status task")?;
        }
        if let Some(task) = taint_task {
            task.await.context("startup taint task")?;
        }
        tracing::info!("imds-broker stopped");
        Ok(())
    }
}
