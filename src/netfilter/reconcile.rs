//! Keeping the capture in place: the [`Reconciler`] that ensures the rules at start and on an interval,
//! its metrics, and the commands one pass runs through a [`Backend`].
//!
//! It does not build rules or parse listings ([`rules`](mod@super::rules) does) and it never removes
//! the capture: only [`super::uninstall`] does, on an operator's command.
//!
//! Invariants: our chain is complete before the `PREROUTING` jump to it is (re)inserted; the jump is the
//! first rule of `PREROUTING` and appears once; a pass that changes nothing runs only read commands
//! (`-S`, `-C`); [`Reconciler::run`] keeps iptables off the async workers.

use std::sync::Arc;

use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use tokio_util::sync::CancellationToken;

use super::rules::{Rules, fingerprint, insert_first, jumps_to_us, listed_rules, nat, nat_rule, rules};
use super::{Backend, CHAIN, Config, Error, Family, Program, conntrack_flush};

/// What one reconcile pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Everything was already in place.
    Unchanged,
    /// Something was missing, changed or out of place, and was put back.
    Changed,
}

/// Reconcile metrics.
#[derive(Clone)]
pub struct Metrics {
    reconciles: IntCounterVec,
    repairs: IntCounter,
}

impl Metrics {
    /// Creates and registers the metrics.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let reconciles = IntCounterVec::new(
            Opts::new(
                "imds_broker_iptables_reconciles_total",
                "iptables reconcile passes by result (unchanged, installed, repaired, error)",
            ),
            &["result"],
        )?;
        let repairs = IntCounter::new(
            "imds_broker_iptables_repairs_total",
            "Reconcile passes, after the first, that found our rules missing, changed or out of place",
        )?;
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(repairs.clone()))?;
        Ok(Self { reconciles, repairs })
    }
}

/// Keeps the capture rules in place.
pub struct Reconciler<B> {
    config: Config,
    backend: Arc<B>,
    metrics: Metrics,
}

impl<B: Backend> Reconciler<B> {
    /// A reconciler running its commands through `backend`.
    pub fn build(config: Config, backend: B, registry: &Registry) -> prometheus::Result<Self> {
        Ok(Self {
            config,
            backend: Arc::new(backend),
            metrics: Metrics::register(registry)?,
        })
    }

    /// Makes every family that has a node IP match [`rules`]; idempotent.
    pub fn ensure(&self) -> Result<Outcome, Error> {
        ensure(&*self.backend, &self.config)
    }

    /// Ensures the rules now and then every `reconcile_interval` until `shutdown`; never removes them.
    /// `installed` is true while the last pass left the rules in place.
    pub async fn run(self, installed: tokio::sync::watch::Sender<bool>, shutdown: CancellationToken) {
        let mut interval = tokio::time::interval(self.config.reconcile_interval);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut first = true;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = interval.tick() => {}
            }
            let backend = self.backend.clone();
            let config = self.config.clone();
            // iptables blocks on the xtables lock for up to LOCK_WAIT_SECONDS; keep it off the workers.
            let result = tokio::task::spawn_blocking(move || ensure(&*backend, &config))
                .await
                .map_err(Error::from)
                .and_then(|r| r);
            let label = match (&result, first) {
                (Ok(Outcome::Unchanged), _) => "unchanged",
                (Ok(Outcome::Changed), true) => "installed",
                (Ok(Outcome::Changed), false) => "repaired",
                (Err(_), _) => "error",
            };
            self.metrics.reconciles.with_label_values(&[label]).inc();
            match &result {
                Ok(Outcome::Changed) if first => tracing::info!(chain = CHAIN, "iptables capture installed"),
                Ok(Outcome::Changed) => {
                    self.metrics.repairs.inc();
                    tracing::warn!(chain = CHAIN, "iptables capture was missing or displaced; repaired");
                }
                Ok(Outcome::Unchanged) => tracing::debug!(chain = CHAIN, "iptables capture in place"),
                Err(error) => tracing::error!(%error, kind = error.kind(), "iptables reconcile failed"),
            }
            installed.send_replace(result.is_ok());
            if result.is_ok() {
                first = false;
            }
        }
    }
}

/// One pass over every family with a node IP.
pub(super) fn ensure<B: Backend + ?Sized>(backend: &B, config: &Config) -> Result<Outcome, Error> {
    let mut outcome = Outcome::Unchanged;
    for ip in &config.node_ips {
        let wanted = rules(&config.interfaces, *ip, config.port);
        if ensure_family(backend, &wanted)? == Outcome::Changed {
            outcome = Outcome::Changed;
        }
    }
    Ok(outcome)
}

fn ensure_family<B: Backend + ?Sized>(backend: &B, wanted: &Rules) -> Result<Outcome, Error> {
    let program = wanted.family.program();
    let mut outcome = Outcome::Unchanged;

    // Our chain first, so the jump never points at a missing or half-filled chain.
    let chain_ok = match backend.run(program, &nat(&["-S", CHAIN])) {
        Err(Error::Failed { .. }) => {
            backend.run(program, &nat(&["-N", CHAIN]))?;
            false
        }
        Err(other) => return Err(other),
        Ok(listing) => {
            let present = listed_rules(&listing, CHAIN);
            present.len() == wanted.chain.len()
                && present
                    .iter()
                    .zip(&wanted.chain)
                    .all(|(have, want)| fingerprint(have) == fingerprint(want))
                && wanted
                    .chain
                    .iter()
                    .all(|spec| backend.run(program, &nat_rule("-C", CHAIN, spec)).is_ok())
        }
    };
    if !chain_ok {
        backend.run(program, &nat(&["-F", CHAIN]))?;
        for spec in &wanted.chain {
            backend.run(program, &nat_rule("-A", CHAIN, spec))?;
        }
        outcome = Outcome::Changed;
    }

    let listing = backend.run(program, &nat(&["-S", "PREROUTING"]))?;
    let prerouting = listed_rules(&listing, "PREROUTING");
    let ours: Vec<&Vec<String>> = prerouting.iter().filter(|spec| jumps_to_us(spec)).collect();
    let in_place = ours.len() == 1
        && prerouting.first().is_some_and(|first| jumps_to_us(first))
        && backend
            .run(program, &nat_rule("-C", "PREROUTING", &wanted.jump))
            .is_ok();
    if !in_place {
        // Delete before inserting: `-D` by spec removes the first match, which would be the new rule.
        for spec in ours {
            backend.run(program, &nat_rule("-D", "PREROUTING", spec))?;
        }
        backend.run(program, &nat_rule("-I", "PREROUTING", &insert_first(&wanted.jump)))?;
        // Connections a pod opened to the real IMDS before the capture existed (or during the move)
        // would keep going there: NAT is decided on a connection's first packet only.
        flush_conntrack(backend, wanted.family);
        outcome = Outcome::Changed;
    }
    Ok(outcome)
}

fn flush_conntrack<B: Backend + ?Sized>(backend: &B, family: Family) {
    match backend.run(Program::Conntrack, &conntrack_flush(family)) {
        Ok(_) => {}
        // conntrack exits 1 when there was nothing to delete.
        Err(Error::Failed { code: Some(1), .. }) => {}
        Err(error) => tracing::warn!(%error, "could not flush conntrack entries to the metadata address"),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::netfilter::fake::{Fake, config, other_rule};

    fn reconciler(fake: Fake, config: Config) -> Reconciler<Fake> {
        Reconciler::build(config, fake, &Registry::new()).unwrap()
    }

    #[test]
    fn first_ensure_creates_the_chain_puts_the_jump_on_top_and_flushes_conntrack() {
        let fake = Fake::new();
        fake.set_chain("iptables", "PREROUTING", vec![other_rule()]);
        let reconciler = reconciler(fake, config(&["cali+"], &["10.0.0.7"]));
        assert_eq!(reconciler.ensure().unwrap(), Outcome::Changed);
        let fake = &reconciler.backend;
        let mutations = fake.mutations();
        assert_eq!(mutations[0], "iptables -w 5 -t nat -N IMDS-BROKER");
        assert!(
            mutations
                .iter()
                .any(|c| c.starts_with("iptables -w 5 -t nat -A IMDS-BROKER"))
        );
        assert!(
            mutations
                .iter()
                .any(|c| c.starts_with("iptables -w 5 -t nat -I PREROUTING 1 -d"))
        );
        assert_eq!(mutations.last().unwrap(), "conntrack -D -f ipv4 -d 169.254.169.254");
        let prerouting = fake.chain("iptables", "PREROUTING").unwrap();
        assert!(jumps_to_us(&prerouting[0]));
        assert_eq!(prerouting[1], other_rule());
        assert!(
            fake.chain("ip6tables", CHAIN).is_none(),
            "no IPv6 node IP, no IPv6 rules"
        );
    }

    #[test]
    fn a_second_ensure_changes_nothing() {
        let reconciler = reconciler(Fake::new(), config(&["cali+", "!eth0"], &["10.0.0.7", "fd00::2"]));
        assert_eq!(reconciler.ensure().unwrap(), Outcome::Changed);
        reconciler.backend.commands();
        assert_eq!(reconciler.ensure().unwrap(), Outcome::Unchanged);
        assert_eq!(reconciler.backend.mutations(), Vec::<String>::new());
    }

    #[test]
    fn a_deleted_jump_comes_back_on_top() {
        let reconciler = reconciler(Fake::new(), config(&["cali+"], &["10.0.0.7"]));
        reconciler.ensure().unwrap();
        reconciler
            .backend
            .set_chain("iptables", "PREROUTING", vec![other_rule()]);
        assert_eq!(reconciler.ensure().unwrap(), Outcome::Changed);
        let prerouting = reconciler.backend.chain("iptables", "PREROUTING").unwrap();
        assert_eq!(prerouting.len(), 2);
        assert!(jumps_to_us(&prerouting[0]));
    }

    #[test]
    fn a_demoted_jump_moves_back_to_the_top_without_duplicates() {
        let reconciler = reconciler(Fake::new(), config(&["cali+"], &["10.0.0.7"]));
        reconciler.ensure().unwrap();
        let mut prerouting = reconciler.backend.chain("iptables", "PREROUTING").unwrap();
        prerouting.insert(0, other_rule());
        reconciler.backend.set_chain("iptables", "PREROUTING", prerouting);
        assert_eq!(reconciler.ensure().unwrap(), Outcome::Changed);
        let prerouting = reconciler.backend.chain("iptables", "PREROUTING").unwrap();
        assert_eq!(prerouting.len(), 2);
        assert!(jumps_to_us(&prerouting[0]));
        assert_eq!(prerouting[1], other_rule());
    }

    #[test]
    fn a_tampered_chain_is_rebuilt() {
        let reconciler = reconciler(Fake::new(), config(&["cali+", "!eth0"], &["10.0.0.7"]));
        reconciler.ensure().unwrap();
        let wanted = reconciler.backend.chain("iptables", CHAIN).unwrap();
        let mut swapped = wanted.clone();
        swapped.reverse();
        reconciler.backend.set_chain("iptables", CHAIN, swapped);
        assert_eq!(reconciler.ensure().unwrap(), Outcome::Changed);
        assert_eq!(reconciler.backend.chain("iptables", CHAIN).unwrap(), wanted);
        reconciler.backend.set_chain("iptables", CHAIN, vec![]);
        assert_eq!(reconciler.ensure().unwrap(), Outcome::Changed);
        assert_eq!(reconciler.backend.chain("iptables", CHAIN).unwrap(), wanted);
    }

    #[tokio::test(start_paused = true)]
    async fn run_installs_then_counts_repairs_and_stops_on_shutdown() {
        let registry = Registry::new();
        let fake = Arc::new(Fake::new());
        struct Shared(Arc<Fake>);
        impl Backend for Shared {
            fn run(&self, program: Program, args: &[String]) -> Result<String, Error> {
                self.0.run(program, args)
            }
        }
        let mut config = config(&["cali+"], &["10.0.0.7"]);
        config.reconcile_interval = Duration::from_secs(1);
        let reconciler = Reconciler::build(config, Shared(fake.clone()), &registry).unwrap();
        let shutdown = CancellationToken::new();
        let (installed_tx, mut installed) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(reconciler.run(installed_tx, shutdown.clone()));
        let count = |name: &str| -> u64 {
            registry
                .gather()
                .iter()
                .filter(|family| family.name() == name)
                .flat_map(|family| family.get_metric().iter().map(|m| m.get_counter().get_value() as u64))
                .sum()
        };
        // spawn_blocking runs on real threads; give each pass a bounded number of turns to land.
        let wait_for = |name: &'static str, at_least: u64| {
            let count = &count;
            async move {
                for _ in 0..1000 {
                    if count(name) >= at_least {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                panic!("{name} never reached {at_least}");
            }
        };
        wait_for("imds_broker_iptables_reconciles_total", 1).await;
        tokio::time::timeout(Duration::from_secs(10), installed.wait_for(|i| *i))
            .await
            .expect("the first pass reports the rules installed")
            .unwrap();
        assert_eq!(count("imds_broker_iptables_repairs_total"), 0);
        fake.set_chain("iptables", "PREROUTING", vec![]);
        wait_for("imds_broker_iptables_repairs_total", 1).await;
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
        assert!(
            jumps_to_us(&fake.chain("iptables", "PREROUTING").unwrap()[0]),
            "rules stay after shutdown"
        );
    }
}
