//! The iptables rules that send pods' `169.254.169.254:80` (and `[fd00:ec2::254]:80`) to this agent.
//!
//! In the `nat` table we own one chain, [`CHAIN`], jumped to from the first rule of `PREROUTING`. It DNATs
//! TCP to the instance-metadata address arriving on the `--host-interface` patterns to `--node-ip` and the
//! IMDS port. [`Reconciler::ensure`] makes the tables look like that and reports whether it had to change
//! anything; [`Reconciler::run`] repeats it on an interval, so a deleted or demoted rule comes back.
//!
//! Deliberately, nothing is removed on shutdown: while the agent is down or restarting, captured traffic
//! meets a closed port (connection refused) instead of the node's own IMDS and the node's role. Only
//! [`uninstall`] removes our rules. Traffic from `hostNetwork` pods never passes `PREROUTING` and is not
//! captured.
//!
//! Every command goes through a [`Backend`], so the rule building and the reconcile decisions are tested
//! with a fake that records commands; [`System`] runs the real binaries. Rules are compared by asking
//! iptables (`-C`) rather than by matching its printed form, which differs between versions; deletions
//! use the printed rule itself (`-D` plus the spec), never a rule number another writer could shift.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use tokio_util::sync::CancellationToken;

/// The chain this agent owns in the `nat` table.
pub const CHAIN: &str = "IMDS-BROKER";
/// The instance-metadata address pods dial over IPv4.
pub const IMDS_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// The instance-metadata address pods dial over IPv6 (Nitro instances).
pub const IMDS_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254);
/// Seconds iptables waits for the xtables lock held by kube-proxy, the CNI or another agent.
const LOCK_WAIT_SECONDS: &str = "5";
const JUMP_COMMENT: &str = "imds-broker: capture instance metadata";
const DNAT_COMMENT: &str = "imds-broker: to the node agent";
const RETURN_COMMENT: &str = "imds-broker: not a pod interface";

/// Where the rules send captured traffic and which interfaces they capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Interfaces whose incoming traffic is captured (`cali+`) or never captured (`!eth0`).
    pub interfaces: Vec<Interface>,
    /// The node's addresses, at most one per family; a family without one gets no rules.
    pub node_ips: Vec<IpAddr>,
    /// The port the IMDS endpoint listens on.
    pub port: u16,
    /// How often the rules are checked and repaired.
    pub reconcile_interval: Duration,
}

/// An iptables interface pattern: a name, `+` as a trailing wildcard, `!` in front to exclude.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// The name or prefix, as iptables takes it (`cali+`, `cni0`).
    pub name: String,
    /// Whether the pattern excludes rather than includes.
    pub negated: bool,
}

/// Why an interface pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InterfaceError {
    #[error("an interface pattern must not be empty")]
    Empty,
    #[error("{0:?} is longer than the 15 characters of a Linux interface name")]
    TooLong(String),
    #[error("{0:?} may hold only letters, digits, '-', '_', '.', '@' and a trailing '+'")]
    Character(String),
}

impl Interface {
    /// Parses `cali+`, `eni+`, `cni0` or `!eth0`.
    pub fn parse(pattern: &str) -> Result<Self, InterfaceError> {
        let pattern = pattern.trim();
        let (negated, name) = match pattern.strip_prefix('!') {
            Some(rest) => (true, rest.trim_start()),
            None => (false, pattern),
        };
        if name.is_empty() || name == "+" {
            return Err(InterfaceError::Empty);
        }
        if name.len() > 15 {
            return Err(InterfaceError::TooLong(name.to_owned()));
        }
        let stem = name.strip_suffix('+').unwrap_or(name);
        if !stem
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'))
        {
            return Err(InterfaceError::Character(name.to_owned()));
        }
        Ok(Self {
            name: name.to_owned(),
            negated,
        })
    }
}

/// An IP family, each with its own tables and binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// `iptables`, 169.254.169.254.
    V4,
    /// `ip6tables`, fd00:ec2::254.
    V6,
}

impl Family {
    /// Both families, IPv4 first.
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    /// The program managing this family's tables.
    pub fn program(self) -> Program {
        match self {
            Family::V4 => Program::Iptables,
            Family::V6 => Program::Ip6tables,
        }
    }

    /// The instance-metadata destination, with its prefix length as iptables prints it.
    fn imds(self) -> String {
        match self {
            Family::V4 => format!("{IMDS_V4}/32"),
            Family::V6 => format!("{IMDS_V6}/128"),
        }
    }

    fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

/// A program the [`Backend`] may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Program {
    /// `iptables`.
    Iptables,
    /// `ip6tables`.
    Ip6tables,
    /// `conntrack`, to forget connections made before the capture existed.
    Conntrack,
}

impl Program {
    /// The executable name, looked up on `PATH`.
    pub fn binary(self) -> &'static str {
        match self {
            Program::Iptables => "iptables",
            Program::Ip6tables => "ip6tables",
            Program::Conntrack => "conntrack",
        }
    }
}

/// Why a command or a reconcile pass failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("`{program} {args}` exited with {code:?}: {stderr}")]
    Failed {
        program: &'static str,
        args: String,
        code: Option<i32>,
        stderr: String,
    },
    #[error("the reconcile pass did not finish: {0}")]
    Join(#[from] tokio::task::JoinError),
}

impl Error {
    /// A closed label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Spawn { .. } => "spawn",
            Error::Failed { .. } => "failed",
            Error::Join(_) => "join",
        }
    }
}

/// Runs one command and returns its standard output, or [`Error::Failed`] on a non-zero exit.
pub trait Backend: Send + Sync + 'static {
    /// Runs `program` with exactly `args`.
    fn run(&self, program: Program, args: &[String]) -> Result<String, Error>;
}

/// The real backend: runs the binaries found on `PATH` (needs `CAP_NET_ADMIN`).
#[derive(Debug, Clone, Copy, Default)]
pub struct System;

impl Backend for System {
    fn run(&self, program: Program, args: &[String]) -> Result<String, Error> {
        let output = Command::new(program.binary())
            .args(args)
            .output()
            .map_err(|source| Error::Spawn {
                program: program.binary(),
                source,
            })?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(Error::Failed {
                program: program.binary(),
                args: args.join(" "),
                code: output.status.code(),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            })
        }
    }
}

/// The rules one family should have: the `PREROUTING` jump and our chain's contents, as rule specs
/// (what follows `-A <chain>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    /// The family these rules are for.
    pub family: Family,
    /// The first rule of `PREROUTING`.
    pub jump: Vec<String>,
    /// The rules of [`CHAIN`], in order.
    pub chain: Vec<Vec<String>>,
}

/// Builds the rules sending `family`'s metadata traffic to `node_ip:port`.
///
/// Exclusions (`!eth0`) become `RETURN` rules placed first, so several of them combine with AND; then one
/// DNAT per included pattern, or a single DNAT for every other interface when only exclusions are given.
pub fn rules(interfaces: &[Interface], node_ip: IpAddr, port: u16) -> Rules {
    let family = Family::of(node_ip);
    let to = match node_ip {
        IpAddr::V4(ip) => format!("{ip}:{port}"),
        IpAddr::V6(ip) => format!("[{ip}]:{port}"),
    };
    let matching = |interface: Option<&str>| {
        let mut spec = strings(&["-d", &family.imds()]);
        if let Some(name) = interface {
            spec.extend(strings(&["-i", name]));
        }
        spec.extend(strings(&[
            "-p",
            "tcp",
            "-m",
            "tcp",
            "--dport",
            "80",
            "-m",
            "comment",
            "--comment",
        ]));
        spec
    };
    let dnat = |interface: Option<&str>| {
        let mut spec = matching(interface);
        spec.extend(strings(&[DNAT_COMMENT, "-j", "DNAT", "--to-destination", &to]));
        spec
    };
    let mut chain = Vec::new();
    for interface in interfaces.iter().filter(|i| i.negated) {
        let mut spec = matching(Some(&interface.name));
        spec.extend(strings(&[RETURN_COMMENT, "-j", "RETURN"]));
        chain.push(spec);
    }
    let included: Vec<&Interface> = interfaces.iter().filter(|i| !i.negated).collect();
    if included.is_empty() {
        chain.push(dnat(None));
    }
    for interface in included {
        chain.push(dnat(Some(&interface.name)));
    }
    let mut jump = matching(None);
    jump.extend(strings(&[JUMP_COMMENT, "-j", CHAIN]));
    Rules { family, jump, chain }
}

/// The argv of an iptables command on the `nat` table, waiting for the xtables lock.
pub fn nat(args: &[&str]) -> Vec<String> {
    let mut argv = strings(&["-w", LOCK_WAIT_SECONDS, "-t", "nat"]);
    argv.extend(strings(args));
    argv
}

/// The argv of `<op> <chain> <spec…>` on the `nat` table.
fn nat_rule(op: &str, chain: &str, spec: &[String]) -> Vec<String> {
    let mut argv = nat(&[op, chain]);
    argv.extend(spec.iter().cloned());
    argv
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// Splits a line of `iptables -S` output into arguments, undoing its double quotes and `\"` escapes.
pub fn split_rule(line: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut started = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                started = true;
            }
            '\\' if quoted => {
                if let Some(next) = chars.next() {
                    current.push(next);
                }
            }
            c if c.is_whitespace() && !quoted => {
                if started {
                    args.push(std::mem::take(&mut current));
                    started = false;
                }
            }
            c => {
                current.push(c);
                started = true;
            }
        }
    }
    if started {
        args.push(current);
    }
    args
}

/// The rule specs of `chain` as listed by `-S` (without the leading `-A <chain>`).
fn listed_rules(listing: &str, chain: &str) -> Vec<Vec<String>> {
    listing
        .lines()
        .map(split_rule)
        .filter(|args| args.len() >= 2 && args[0] == "-A" && args[1] == chain)
        .map(|args| args[2..].to_vec())
        .collect()
}

/// What tells two of our chain's rules apart, read from a spec: the interface match and the target.
fn fingerprint(spec: &[String]) -> (Option<(bool, &str)>, Option<&str>) {
    let mut interface = None;
    let mut target = None;
    for (i, arg) in spec.iter().enumerate() {
        match arg.as_str() {
            "-i" => {
                let negated = i > 0 && spec[i - 1] == "!";
                interface = spec.get(i + 1).map(|name| (negated, name.as_str()));
            }
            "-j" => target = spec.get(i + 1).map(String::as_str),
            _ => {}
        }
    }
    (interface, target)
}

fn jumps_to_us(spec: &[String]) -> bool {
    spec.windows(2).any(|w| w[0] == "-j" && w[1] == CHAIN)
}

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
fn ensure<B: Backend + ?Sized>(backend: &B, config: &Config) -> Result<Outcome, Error> {
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

/// `1 <spec…>`: the arguments of `-I PREROUTING` that make the rule the first.
fn insert_first(spec: &[String]) -> Vec<String> {
    let mut args = vec!["1".to_owned()];
    args.extend(spec.iter().cloned());
    args
}

/// The argv that deletes conntrack entries towards the metadata address.
pub fn conntrack_flush(family: Family) -> Vec<String> {
    match family {
        Family::V4 => strings(&["-D", "-f", "ipv4", "-d", &IMDS_V4.to_string()]),
        Family::V6 => strings(&["-D", "-f", "ipv6", "-d", &IMDS_V6.to_string()]),
    }
}

fn flush_conntrack<B: Backend + ?Sized>(backend: &B, family: Family) {
    match backend.run(Program::Conntrack, &conntrack_flush(family)) {
        Ok(_) => {}
        // conntrack exits 1 when there was nothing to delete.
        Err(Error::Failed { code: Some(1), .. }) => {}
        Err(error) => tracing::warn!(%error, "could not flush conntrack entries to the metadata address"),
    }
}

/// What [`uninstall`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Removed {
    /// Families whose tables held our chain or jump.
    pub families: Vec<Family>,
    /// `PREROUTING` rules deleted.
    pub jumps: usize,
}

/// Removes the jump and the chain from both families; missing pieces (or a missing `ip6tables`) are fine.
pub fn uninstall<B: Backend + ?Sized>(backend: &B) -> Result<Removed, Error> {
    let mut removed = Removed::default();
    for family in Family::ALL {
        let program = family.program();
        let listing = match backend.run(program, &nat(&["-S", "PREROUTING"])) {
            Ok(listing) => listing,
            // No ip6tables binary, or no nat table for this family: nothing of ours can be there.
            Err(Error::Spawn { .. }) if family == Family::V6 => continue,
            Err(Error::Failed { .. }) if family == Family::V6 => continue,
            Err(error) => return Err(error),
        };
        let mut touched = false;
        for spec in listed_rules(&listing, "PREROUTING").iter().filter(|s| jumps_to_us(s)) {
            backend.run(program, &nat_rule("-D", "PREROUTING", spec))?;
            removed.jumps += 1;
            touched = true;
        }
        if backend.run(program, &nat(&["-S", CHAIN])).is_ok() {
            backend.run(program, &nat(&["-F", CHAIN]))?;
            backend.run(program, &nat(&["-X", CHAIN]))?;
            touched = true;
        }
        if touched {
            removed.families.push(family);
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use super::*;

    /// Chains of one `nat` table, by name.
    type Table = BTreeMap<String, Vec<Vec<String>>>;

    /// An in-memory `nat` table per program that understands the commands this module sends.
    #[derive(Default)]
    struct Fake {
        tables: Mutex<BTreeMap<&'static str, Table>>,
        log: Mutex<Vec<String>>,
        no_ip6tables: bool,
    }

    impl Fake {
        fn new() -> Self {
            let fake = Self::default();
            for program in ["iptables", "ip6tables"] {
                let mut table = BTreeMap::new();
                table.insert("PREROUTING".to_owned(), Vec::new());
                fake.tables.lock().unwrap().insert(program, table);
            }
            fake
        }

        fn chain(&self, program: &'static str, chain: &str) -> Option<Vec<Vec<String>>> {
            self.tables.lock().unwrap()[program].get(chain).cloned()
        }

        fn set_chain(&self, program: &'static str, chain: &str, rules: Vec<Vec<String>>) {
            self.tables
                .lock()
                .unwrap()
                .get_mut(program)
                .unwrap()
                .insert(chain.to_owned(), rules);
        }

        fn commands(&self) -> Vec<String> {
            std::mem::take(&mut *self.log.lock().unwrap())
        }

        fn mutations(&self) -> Vec<String> {
            self.commands()
                .into_iter()
                .filter(|c| !c.contains(" -S ") && !c.contains(" -C "))
                .collect()
        }
    }

    fn failed(program: Program, args: &[String]) -> Error {
        Error::Failed {
            program: program.binary(),
            args: args.join(" "),
            code: Some(1),
            stderr: "no".to_owned(),
        }
    }

    impl Backend for Fake {
        fn run(&self, program: Program, args: &[String]) -> Result<String, Error> {
            self.log
                .lock()
                .unwrap()
                .push(format!("{} {}", program.binary(), args.join(" ")));
            if program == Program::Conntrack {
                return Err(failed(program, args));
            }
            if program == Program::Ip6tables && self.no_ip6tables {
                return Err(Error::Spawn {
                    program: program.binary(),
                    source: std::io::Error::from(std::io::ErrorKind::NotFound),
                });
            }
            assert_eq!(
                &args[..4],
                &nat(&[])[..],
                "every command waits for the lock on the nat table"
            );
            let mut tables = self.tables.lock().unwrap();
            let table = tables.get_mut(program.binary()).unwrap();
            let (op, chain, rest) = (args[4].as_str(), args[5].clone(), &args[6..]);
            let missing = || failed(program, args);
            match op {
                "-S" => {
                    let rules = table.get(&chain).ok_or_else(missing)?;
                    let mut out = format!("-N {chain}\n");
                    for rule in rules {
                        let quoted: Vec<String> = rule
                            .iter()
                            .map(|a| if a.contains(' ') { format!("\"{a}\"") } else { a.clone() })
                            .collect();
                        out.push_str(&format!("-A {chain} {}\n", quoted.join(" ")));
                    }
                    Ok(out)
                }
                "-N" if table.contains_key(&chain) => Err(missing()),
                "-N" => {
                    table.insert(chain, Vec::new());
                    Ok(String::new())
                }
                "-F" => {
                    table.get_mut(&chain).ok_or_else(missing)?.clear();
                    Ok(String::new())
                }
                "-X" => table.remove(&chain).map(|_| String::new()).ok_or_else(missing),
                "-A" => {
                    table.get_mut(&chain).ok_or_else(missing)?.push(rest.to_vec());
                    Ok(String::new())
                }
                "-I" => {
                    let position: usize = rest[0].parse().unwrap();
                    table
                        .get_mut(&chain)
                        .ok_or_else(missing)?
                        .insert(position - 1, rest[1..].to_vec());
                    Ok(String::new())
                }
                "-C" => table
                    .get(&chain)
                    .filter(|rules| rules.iter().any(|r| r == rest))
                    .map(|_| String::new())
                    .ok_or_else(missing),
                "-D" => {
                    let rules = table.get_mut(&chain).ok_or_else(missing)?;
                    let at = rules.iter().position(|r| r == rest).ok_or_else(missing)?;
                    rules.remove(at);
                    Ok(String::new())
                }
                other => panic!("unexpected iptables operation {other}"),
            }
        }
    }

    fn config(interfaces: &[&str], node_ips: &[&str]) -> Config {
        Config {
            interfaces: interfaces.iter().map(|i| Interface::parse(i).unwrap()).collect(),
            node_ips: node_ips.iter().map(|ip| ip.parse().unwrap()).collect(),
            port: 8181,
            reconcile_interval: Duration::from_secs(30),
        }
    }

    fn reconciler(fake: Fake, config: Config) -> Reconciler<Fake> {
        Reconciler::build(config, fake, &Registry::new()).unwrap()
    }

    fn other_rule() -> Vec<String> {
        strings(&["-s", "10.0.0.0/8", "-j", "RETURN"])
    }

    #[test]
    fn interface_patterns_parse_with_wildcards_and_negation() {
        assert_eq!(
            Interface::parse("cali+"),
            Ok(Interface {
                name: "cali+".into(),
                negated: false
            })
        );
        assert_eq!(
            Interface::parse("!eth0"),
            Ok(Interface {
                name: "eth0".into(),
                negated: true
            })
        );
        assert_eq!(Interface::parse(""), Err(InterfaceError::Empty));
        assert_eq!(Interface::parse("!"), Err(InterfaceError::Empty));
        assert!(matches!(
            Interface::parse("a-very-long-name0"),
            Err(InterfaceError::TooLong(_))
        ));
        assert!(matches!(
            Interface::parse("eth0 -j ACCEPT"),
            Err(InterfaceError::Character(_))
        ));
        assert!(matches!(Interface::parse("ca+li"), Err(InterfaceError::Character(_))));
    }

    #[test]
    fn rules_dnat_each_included_interface_to_the_node() {
        let config = config(&["cali+", "cni0"], &["10.0.0.7"]);
        let rules = rules(&config.interfaces, config.node_ips[0], config.port);
        assert_eq!(rules.family, Family::V4);
        assert_eq!(
            rules.jump.join(" "),
            "-d 169.254.169.254/32 -p tcp -m tcp --dport 80 -m comment --comment \
             imds-broker: capture instance metadata -j IMDS-BROKER"
        );
        let chain: Vec<String> = rules.chain.iter().map(|r| r.join(" ")).collect();
        assert_eq!(
            chain,
            [
                "-d 169.254.169.254/32 -i cali+ -p tcp -m tcp --dport 80 -m comment --comment \
                 imds-broker: to the node agent -j DNAT --to-destination 10.0.0.7:8181",
                "-d 169.254.169.254/32 -i cni0 -p tcp -m tcp --dport 80 -m comment --comment \
                 imds-broker: to the node agent -j DNAT --to-destination 10.0.0.7:8181",
            ]
        );
    }

    #[test]
    fn exclusions_return_first_and_combine_with_and() {
        let config = config(&["!eth0", "!eth1"], &["10.0.0.7"]);
        let rules = rules(&config.interfaces, config.node_ips[0], config.port);
        let shape: Vec<_> = rules.chain.iter().map(|r| fingerprint(r)).collect();
        assert_eq!(
            shape,
            [
                (Some((false, "eth0")), Some("RETURN")),
                (Some((false, "eth1")), Some("RETURN")),
                (None, Some("DNAT")),
            ]
        );
    }

    #[test]
    fn ipv6_rules_use_the_ipv6_metadata_address_and_bracketed_target() {
        let config = config(&["eni+"], &["fd00::2"]);
        let rules = rules(&config.interfaces, config.node_ips[0], config.port);
        assert_eq!(rules.family, Family::V6);
        let dnat = rules.chain[0].join(" ");
        assert!(dnat.starts_with("-d fd00:ec2::254/128 -i eni+"), "{dnat}");
        assert!(dnat.ends_with("--to-destination [fd00::2]:8181"), "{dnat}");
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

    #[test]
    fn uninstall_removes_jump_and_chain_from_both_families_and_is_idempotent() {
        let reconciler = reconciler(Fake::new(), config(&["cali+"], &["10.0.0.7", "fd00::2"]));
        reconciler.ensure().unwrap();
        let fake = &*reconciler.backend;
        let mut prerouting = fake.chain("iptables", "PREROUTING").unwrap();
        prerouting.push(other_rule());
        fake.set_chain("iptables", "PREROUTING", prerouting);
        let removed = uninstall(fake).unwrap();
        assert_eq!(removed.families, [Family::V4, Family::V6]);
        assert_eq!(removed.jumps, 2);
        assert_eq!(fake.chain("iptables", "PREROUTING").unwrap(), vec![other_rule()]);
        assert!(fake.chain("iptables", CHAIN).is_none() && fake.chain("ip6tables", CHAIN).is_none());
        assert_eq!(uninstall(fake).unwrap(), Removed::default());
    }

    #[test]
    fn uninstall_tolerates_a_node_without_ip6tables() {
        let fake = Fake {
            no_ip6tables: true,
            ..Fake::new()
        };
        assert_eq!(uninstall(&fake).unwrap(), Removed::default());
    }

    #[test]
    fn listed_rules_undo_iptables_quoting() {
        let listing = "-N X\n-A X -d 1.2.3.4/32 -m comment --comment \"a \\\"b\\\" c\" -j RETURN\n-A Y -j X\n";
        assert_eq!(
            listed_rules(listing, "X"),
            vec![strings(&[
                "-d",
                "1.2.3.4/32",
                "-m",
                "comment",
                "--comment",
                "a \"b\" c",
                "-j",
                "RETURN"
            ])]
        );
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
