//! Keeping the capture in place: the [`Reconciler`] that ensures the rules at start and on an interval,
//! its metrics, and the commands one pass runs through a [`Backend`].
//!
//! It does not build rules or parse listings ([`rules`](mod@super::rules) does) and it never removes
//! the capture: only [`super::uninstall`] does, on an operator's command.
//!
//! Invariants: every change to a table is one `iptables-restore` transaction (the payload of
//! [`repair`]), so the capture is never absent, not even while it is repaired; after each such change the
//! family's conntrack entries towards the metadata address are flushed; each jump is the first rule of
//! its hook and appears once; a pass that changes nothing runs only read commands (`-S`, `-C`);
//! [`Reconciler::run`] keeps iptables off the async workers.

use std::sync::Arc;

use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use tokio_util::sync::CancellationToken;

use super::rules::{Chain, Observed, Rules, argv, capture, chain_shaped, jump_shaped, listed_rules, repair, rule_argv};
use super::{Backend, CHAIN, Config, Error, Family, LOCAL_CHAIN, Program, Table, conntrack_flush, local_address};

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
        for result in ["unchanged", "installed", "repaired", "error"] {
            reconciles.with_label_values(&[result]);
        }
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
        let wanted = capture(config, *ip);
        if config.container_credentials && ensure_address(backend, wanted.family)? == Outcome::Changed {
            outcome = Outcome::Changed;
        }
        if ensure_family(backend, &wanted)? == Outcome::Changed {
            outcome = Outcome::Changed;
        }
        if !config.container_credentials && remove_local_chain(backend, wanted.family)? {
            // Turned off: the node's own traffic is no longer sent to us (pods' no longer either, as
            // the rewritten nat chain shows). The address on `lo` is left to `iptables uninstall`.
            outcome = Outcome::Changed;
        }
    }
    Ok(outcome)
}

/// Removes [`LOCAL_CHAIN`] and its `OUTPUT` jump; whether either was there.
fn remove_local_chain<B: Backend + ?Sized>(backend: &B, family: Family) -> Result<bool, Error> {
    let program = family.program();
    let listing = backend.run(program, &argv(Table::Nat, &["-S", "OUTPUT"]))?;
    Ok(super::remove_chain(backend, program, Table::Nat, ("OUTPUT", &listing), LOCAL_CHAIN)?.any())
}

/// Puts the container-credentials address on `lo`, so that the node's own connections to it are local
/// (never routed off the node, with or without a default route) and meet [`LOCAL_CHAIN`]'s DNAT.
fn ensure_address<B: Backend + ?Sized>(backend: &B, family: Family) -> Result<Outcome, Error> {
    let address = local_address(family);
    if !backend.run(Program::Ip, &address.show)?.trim().is_empty() {
        return Ok(Outcome::Unchanged);
    }
    backend.run(Program::Ip, &address.add)?;
    Ok(Outcome::Changed)
}

fn ensure_family<B: Backend + ?Sized>(backend: &B, wanted: &Rules) -> Result<Outcome, Error> {
    let mut outcome = Outcome::Unchanged;
    for chain in wanted.chains() {
        let observed = observe(backend, wanted.family, chain)?;
        if let Some(payload) = repair(chain, &observed) {
            backend.restore(wanted.family, chain.table, &payload)?;
            outcome = Outcome::Changed;
        }
    }
    if outcome == Outcome::Changed {
        // NAT is decided on a connection's first packet only: a connection a pod opened to the real IMDS
        // before the capture existed, or that someone else's tampering let through, keeps going there
        // until its conntrack entry is gone. Flushed after every change, install or repair; only the
        // entries that were not DNATed (see `conntrack_flush`).
        flush_conntrack(backend, wanted.family);
    }
    Ok(outcome)
}

/// Reads one table: our chain and the hook as listed, then `-C` for what has the wanted shape.
fn observe<B: Backend + ?Sized>(backend: &B, family: Family, wanted: &Chain) -> Result<Observed, Error> {
    let program = family.program();
    let table = wanted.table;
    let (hook, name) = (wanted.hook, wanted.name);
    let chain = match backend.run(program, &argv(table, &["-S", name])) {
        Ok(listing) => Some(listed_rules(&listing, name)),
        // iptables exits 1 for a chain that does not exist.
        Err(Error::Failed { .. }) => None,
        Err(other) => return Err(other),
    };
    let chain_checked = chain_shaped(wanted, chain.as_deref())
        && wanted
            .rules
            .iter()
            .all(|spec| backend.run(program, &rule_argv(table, "-C", name, spec)).is_ok());
    let listed = listed_rules(&backend.run(program, &argv(table, &["-S", hook]))?, hook);
    let jump_checked = jump_shaped(&listed, name)
        && backend
            .run(program, &rule_argv(table, "-C", hook, &wanted.jump))
            .is_ok();
    Ok(Observed {
        chain,
        hook: listed,
        chain_checked,
        jump_checked,
    })
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
    use crate::netfilter::Table;
    use crate::netfilter::fake::{Fake, config, other_rule};
    use crate::netfilter::rules::jumps_to_us;

    fn reconciler(fake: Fake, config: Config) -> Reconciler<Fake> {
        Reconciler::build(config, fake, &Registry::new()).unwrap()
    }

    /// Another writer's change to the fake tables.
    type Tamper<'a> = Box<dyn Fn(&Fake) + 'a>;

    /// Every write of a pass: whole-table transactions and conntrack flushes, never a lone `-D`/`-I`/`-F`.
    fn assert_only_transactions(mutations: &[String]) {
        for command in mutations {
            assert!(
                command.starts_with("iptables-restore *")
                    || command.starts_with("ip6tables-restore *")
                    || command.starts_with("conntrack -D"),
                "a write outside a transaction: {command}"
            );
        }
    }

    #[test]
    fn first_ensure_installs_each_table_in_one_transaction_and_flushes_conntrack() {
        let fake = Fake::new();
        fake.set_chain("iptables", "PREROUTING", vec![other_rule()]);
        let reconciler = reconciler(fake, config(&["cali+"], &["10.0.0.7"]));
        assert_eq!(reconciler.ensure().unwrap(), Outcome::Changed);
        let fake = &reconciler.backend;
        let mutations = fake.mutations();
        assert_eq!(mutations.len(), 3, "{mutations:#?}");
        assert!(mutations[0].starts_with("iptables-restore *nat | :IMDS-BROKER - [0:0] | -A IMDS-BROKER"));
        assert!(mutations[1].starts_with("iptables-restore *filter | :IMDS-BROKER - [0:0] | -A IMDS-BROKER"));
        assert_eq!(
            mutations[2],
            "conntrack -D -f ipv4 -d 169.254.169.254 --reply-src 169.254.169.254"
        );
        let prerouting = fake.chain("iptables", "PREROUTING").unwrap();
        assert!(jumps_to_us(&prerouting[0]));
        assert_eq!(prerouting[1], other_rule());
        let input = fake.chain_in("iptables", Table::Filter, "INPUT").unwrap();
        assert_eq!(input.len(), 1);
        assert!(jumps_to_us(&input[0]));
        assert!(
            fake.chain("ip6tables", CHAIN).is_none(),
            "no IPv6 node IP, no IPv6 rules"
        );
    }

    #[test]
    fn a_failed_transaction_changes_nothing_and_reports_the_error() {
        let fake = Fake {
            restore_fails: true,
            ..Fake::new()
        };
        fake.set_chain("iptables", "PREROUTING", vec![other_rule()]);
        let reconciler = reconciler(fake, config(&["cali+"], &["10.0.0.7"]));
        assert!(matches!(reconciler.ensure(), Err(Error::Failed { .. })));
        assert_eq!(
            reconciler.backend.chain("iptables", "PREROUTING").unwrap(),
            vec![other_rule()]
        );
        assert!(reconciler.backend.chain("iptables", CHAIN).is_none());
    }

    #[test]
    fn every_repair_is_one_transaction_followed_by_a_conntrack_flush() {
        let reconciler = reconciler(Fake::new(), config(&["cali+", "!eth0"], &["10.0.0.7"]));
        reconciler.ensure().unwrap();
        let wanted = reconciler.backend.chain("iptables", CHAIN).unwrap();
        let jump = reconciler.backend.chain("iptables", "PREROUTING").unwrap()[0].clone();
        reconciler.backend.commands();
        let tamperings: [(&str, Tamper); 4] = [
            (
                "jump deleted",
                Box::new(|f: &Fake| f.set_chain("iptables", "PREROUTING", vec![])),
            ),
            (
                "jump demoted",
                Box::new(|f: &Fake| f.set_chain("iptables", "PREROUTING", vec![other_rule(), jump.clone()])),
            ),
            (
                "jump duplicated",
                Box::new(|f: &Fake| {
                    f.set_chain("iptables", "PREROUTING", vec![jump.clone(), other_rule(), jump.clone()])
                }),
            ),
            (
                "chain flushed",
                Box::new(|f: &Fake| f.set_chain("iptables", CHAIN, vec![])),
            ),
        ];
        for (what, tamper) in &tamperings {
            tamper(&reconciler.backend);
            assert_eq!(reconciler.ensure().unwrap(), Outcome::Changed, "{what}");
            let mutations = reconciler.backend.mutations();
            assert_only_transactions(&mutations);
            assert_eq!(mutations.len(), 2, "{what}: {mutations:#?}");
            assert_eq!(
                mutations[1], "conntrack -D -f ipv4 -d 169.254.169.254 --reply-src 169.254.169.254",
                "{what}"
            );
            let prerouting = reconciler.backend.chain("iptables", "PREROUTING").unwrap();
            assert_eq!(prerouting.iter().filter(|r| jumps_to_us(r)).count(), 1, "{what}");
            assert!(jumps_to_us(&prerouting[0]), "{what}");
            assert_eq!(reconciler.backend.chain("iptables", CHAIN).unwrap(), wanted, "{what}");
            assert_eq!(reconciler.ensure().unwrap(), Outcome::Unchanged, "{what}");
        }
    }

    #[test]
    fn a_removed_guard_of_the_imds_port_comes_back() {
        let reconciler = reconciler(Fake::new(), config(&["cali+"], &["10.0.0.7", "fd00::2"]));
        reconciler.ensure().unwrap();
        let guard = reconciler.backend.chain_in("ip6tables", Table::Filter, CHAIN).unwrap();
        reconciler
            .backend
            .set_chain_in("ip6tables", Table::Filter, "INPUT", vec![]);
        reconciler.backend.commands();
        assert_eq!(reconciler.ensure().unwrap(), Outcome::Changed);
        let mutations = reconciler.backend.mutations();
        assert_only_transactions(&mutations);
        assert!(mutations[0].starts_with("ip6tables-restore *filter"), "{mutations:#?}");
        assert_eq!(
            mutations[1],
            "conntrack -D -f ipv6 -d fd00:ec2::254 --reply-src fd00:ec2::254"
        );
        let input = reconciler
            .backend
            .chain_in("ip6tables", Table::Filter, "INPUT")
            .unwrap();
        assert!(input.len() == 1 && jumps_to_us(&input[0]));
        assert_eq!(
            reconciler.backend.chain_in("ip6tables", Table::Filter, CHAIN).unwrap(),
            guard
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
            fn restore(&self, family: Family, table: Table, payload: &str) -> Result<(), Error> {
                self.0.restore(family, table, payload)
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
