//! The iptables rules that send pods' `169.254.169.254:80` (and `[fd00:ec2::254]:80`) to this agent, and
//! keep the agent's IMDS port for pods alone.
//!
//! In the `nat` table we own one chain, [`CHAIN`], jumped to from the first rule of `PREROUTING`. It DNATs
//! TCP to the instance-metadata address arriving on the `--host-interface` patterns to `--node-ip` and the
//! IMDS port. In the `filter` table a chain of the same name, jumped to from the first rule of `INPUT` for
//! TCP to `--node-ip` and the IMDS port, drops what does not arrive on those interfaces (the admin port is
//! not matched). [`Reconciler::ensure`] makes the tables look like that and reports whether it had to
//! change anything; [`Reconciler::run`] repeats it on an interval, so a deleted or demoted rule comes back.
//!
//! Every change is one `iptables-restore --noflush` transaction per table (see [`rules::repair`]): the
//! kernel swaps the table at once, so neither the install nor a repair ever leaves a moment in which
//! 169.254.169.254 is not captured, and a failed repair changes nothing.
//!
//! This module owns the public vocabulary ([`Config`], [`Interface`], [`Family`], [`Program`]), the
//! [`Backend`] every command goes through, [`System`] (which runs the real binaries), the [`Error`] of
//! the whole component and [`uninstall`]. The rules themselves are built, the restore payload written and
//! iptables' output parsed in [`rules`](mod@rules), purely; [`reconcile`] reads the tables, decides and
//! applies.
//!
//! Deliberately, nothing is removed on shutdown: while the agent is down or restarting, captured traffic
//! meets a closed port (connection refused) instead of the node's own IMDS and the node's role. Only
//! [`uninstall`] removes our rules. Traffic from `hostNetwork` pods never passes `PREROUTING` and is not
//! captured.
//!
//! Every command goes through a [`Backend`], so the rule building and the reconcile decisions are tested
//! with a fake that records commands (`fake.rs`, compiled for tests only). Rules are compared by asking
//! iptables (`-C`) rather than by matching its printed form, which differs between versions; deletions
//! use the printed rule itself (`-D` plus the spec), never a rule number another writer could shift.

#[cfg(test)]
mod fake;
pub mod reconcile;
pub mod rules;
pub mod status;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::Command;
use std::time::Duration;

pub use reconcile::{Metrics, Outcome, Reconciler};
pub use rules::{Chain, Observed, Rules, Table, argv, capture, conntrack_flush, repair, rules, split_rule};

use rules::{jumps_to, listed_rules, restore_argv, rule_argv, strings};

/// The chain this agent owns in the `nat` and the `filter` table.
pub const CHAIN: &str = "IMDS-BROKER";
/// The chain this agent owns in `nat`'s `OUTPUT` with `--container-credentials`: the node's own
/// connections to the container-credentials address.
pub const LOCAL_CHAIN: &str = "IMDS-BROKER-LOCAL";
/// The instance-metadata address pods dial over IPv4.
pub const IMDS_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// The instance-metadata address pods dial over IPv6 (Nitro instances).
pub const IMDS_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254);

/// The container-credentials address (EKS Pod Identity's) pods dial over IPv4.
pub const CONTAINER_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 170, 23);
/// The container-credentials address pods dial over IPv6.
pub const CONTAINER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x23);

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
    /// Also capture the container-credentials address ([`CONTAINER_V4`], [`CONTAINER_V6`]), from pods
    /// and from the node itself.
    pub container_credentials: bool,
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
    /// Nothing, or only `!` or `+`.
    #[error("an interface pattern must not be empty")]
    Empty,
    /// Longer than `IFNAMSIZ` allows.
    #[error("{0:?} is longer than the 15 characters of a Linux interface name")]
    TooLong(String),
    /// A character iptables or the kernel would not take, or a `+` before the end.
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

    /// The program applying a transaction to this family's tables.
    pub fn restore_program(self) -> Program {
        match self {
            Family::V4 => Program::IptablesRestore,
            Family::V6 => Program::Ip6tablesRestore,
        }
    }

    /// The instance-metadata destination, with its prefix length as iptables prints it.
    fn imds(self) -> String {
        match self {
            Family::V4 => format!("{IMDS_V4}/32"),
            Family::V6 => format!("{IMDS_V6}/128"),
        }
    }

    /// The container-credentials destination, with its prefix length as iptables prints it.
    fn container(self) -> String {
        match self {
            Family::V4 => format!("{CONTAINER_V4}/32"),
            Family::V6 => format!("{CONTAINER_V6}/128"),
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
    /// `iptables-restore`, which applies a whole table's changes in one transaction.
    IptablesRestore,
    /// `ip6tables-restore`.
    Ip6tablesRestore,
    /// `conntrack`, to forget connections made before the capture existed.
    Conntrack,
    /// `ip` (iproute2), to put the container-credentials address on `lo`.
    Ip,
}

impl Program {
    /// The executable name, looked up on `PATH`.
    pub fn binary(self) -> &'static str {
        match self {
            Program::Iptables => "iptables",
            Program::Ip6tables => "ip6tables",
            Program::IptablesRestore => "iptables-restore",
            Program::Ip6tablesRestore => "ip6tables-restore",
            Program::Conntrack => "conntrack",
            Program::Ip => "ip",
        }
    }
}

/// Why a command or a reconcile pass failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The program could not be started (not on `PATH`, not executable).
    #[error("cannot run {program}: {source}")]
    Spawn {
        /// The executable.
        program: &'static str,
        /// Why it did not start.
        #[source]
        source: std::io::Error,
    },
    /// The program ran and exited non-zero (iptables does so for a missing chain or rule too).
    #[error("`{program} {args}` exited with {code:?}: {stderr}")]
    Failed {
        /// The executable.
        program: &'static str,
        /// Its arguments, joined by spaces.
        args: String,
        /// The exit code, `None` when killed by a signal.
        code: Option<i32>,
        /// Its standard error, trimmed.
        stderr: String,
    },
    /// The blocking task running a pass panicked or was cancelled.
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

    /// Applies `payload` (`iptables-restore` format, naming `table` only) to `family`'s tables in one
    /// transaction: all of it, or nothing on error.
    fn restore(&self, family: Family, table: Table, payload: &str) -> Result<(), Error>;
}

/// The real backend: runs the binaries found on `PATH` (needs `CAP_NET_ADMIN`).
#[derive(Debug, Clone, Copy, Default)]
pub struct System;

impl System {
    fn exec(program: Program, args: &[String], stdin: Option<&str>) -> Result<String, Error> {
        use std::io::Write as _;
        use std::process::Stdio;

        let spawn_error = |source| Error::Spawn {
            program: program.binary(),
            source,
        };
        let mut child = Command::new(program.binary())
            .args(args)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_error)?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // The pipe closes when `pipe` drops, which is how iptables-restore learns the payload ended.
            pipe.write_all(input.as_bytes()).map_err(spawn_error)?;
        }
        let output = child.wait_with_output().map_err(spawn_error)?;
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

impl Backend for System {
    fn run(&self, program: Program, args: &[String]) -> Result<String, Error> {
        Self::exec(program, args, None)
    }

    fn restore(&self, family: Family, table: Table, payload: &str) -> Result<(), Error> {
        debug_assert!(payload.starts_with(&format!("*{}\n", table.name())));
        Self::exec(family.restore_program(), &restore_argv(), Some(payload)).map(drop)
    }
}

/// What [`uninstall`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Removed {
    /// Families whose tables held one of our chains or jumps, or whose `lo` held our address.
    pub families: Vec<Family>,
    /// `PREROUTING`, `OUTPUT` and `INPUT` rules deleted.
    pub jumps: usize,
}

/// Every chain we may own: table, hook, chain.
const OWNED: [(Table, &str, &str); 3] = [
    (Table::Nat, "PREROUTING", CHAIN),
    (Table::Nat, "OUTPUT", LOCAL_CHAIN),
    (Table::Filter, "INPUT", CHAIN),
];

/// The `ip` commands that manage the container-credentials address on `lo`.
pub struct LocalAddress {
    /// Lists it (empty output: absent).
    pub show: Vec<String>,
    /// Adds it, scope host (never picked as a source address).
    pub add: Vec<String>,
    /// Removes it.
    pub delete: Vec<String>,
}

/// The `ip` argvs for `family`'s container-credentials address on `lo`.
pub fn local_address(family: Family) -> LocalAddress {
    let (flag, address) = match family {
        Family::V4 => ("-4", format!("{CONTAINER_V4}/32")),
        Family::V6 => ("-6", format!("{CONTAINER_V6}/128")),
    };
    LocalAddress {
        show: strings(&["-o", flag, "addr", "show", "dev", "lo", "to", &address]),
        add: strings(&[flag, "addr", "add", &address, "dev", "lo", "scope", "host"]),
        delete: strings(&[flag, "addr", "del", &address, "dev", "lo"]),
    }
}

/// What [`remove_chain`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ChainRemoval {
    /// Jumps deleted from the hook.
    pub jumps: usize,
    /// Whether the chain existed (and is gone).
    pub chain: bool,
}

impl ChainRemoval {
    /// Whether anything was there.
    pub fn any(self) -> bool {
        self.jumps > 0 || self.chain
    }
}

/// Removes `chain` and every jump to it from `hook`, as `hook_listing` (`-S hook`) shows them; nothing
/// to remove is fine.
pub(crate) fn remove_chain<B: Backend + ?Sized>(
    backend: &B,
    program: Program,
    table: Table,
    (hook, hook_listing): (&str, &str),
    chain: &str,
) -> Result<ChainRemoval, Error> {
    let mut removed = ChainRemoval::default();
    for spec in listed_rules(hook_listing, hook).iter().filter(|s| jumps_to(s, chain)) {
        backend.run(program, &rule_argv(table, "-D", hook, spec))?;
        removed.jumps += 1;
    }
    if backend.run(program, &argv(table, &["-S", chain])).is_ok() {
        backend.run(program, &argv(table, &["-F", chain]))?;
        backend.run(program, &argv(table, &["-X", chain]))?;
        removed.chain = true;
    }
    Ok(removed)
}

/// Removes the jumps and the chains of both tables from both families, and the container-credentials
/// address from `lo`; missing pieces (or a missing `ip6tables`) are fine.
///
/// Not one transaction: removing the capture is the point, and a half-done uninstall is finished by the
/// next one.
pub fn uninstall<B: Backend + ?Sized>(backend: &B) -> Result<Removed, Error> {
    let mut removed = Removed::default();
    for family in Family::ALL {
        let program = family.program();
        let mut touched = false;
        for (table, hook, chain) in OWNED {
            // Listing the hook first tells whether this family's table exists at all.
            let listing = match backend.run(program, &argv(table, &["-S", hook])) {
                Ok(listing) => listing,
                // No ip6tables binary, or no such table for this family: nothing of ours can be there.
                Err(Error::Spawn { .. } | Error::Failed { .. }) if family == Family::V6 => continue,
                Err(error) => return Err(error),
            };
            let gone = remove_chain(backend, program, table, (hook, &listing), chain)?;
            removed.jumps += gone.jumps;
            touched |= gone.any();
        }
        let address = local_address(family);
        if backend
            .run(Program::Ip, &address.show)
            .is_ok_and(|listed| !listed.trim().is_empty())
        {
            backend.run(Program::Ip, &address.delete)?;
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
    use super::fake::{Fake, config, other_rule};
    use super::*;

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
    fn uninstall_removes_jump_and_chain_from_both_families_and_is_idempotent() {
        let fake = &Fake::new();
        reconcile::ensure(fake, &config(&["cali+"], &["10.0.0.7", "fd00::2"])).unwrap();
        let mut prerouting = fake.chain("iptables", "PREROUTING").unwrap();
        prerouting.push(other_rule());
        fake.set_chain("iptables", "PREROUTING", prerouting);
        let removed = uninstall(fake).unwrap();
        assert_eq!(removed.families, [Family::V4, Family::V6]);
        assert_eq!(removed.jumps, 4, "PREROUTING and INPUT, in both families");
        assert_eq!(fake.chain("iptables", "PREROUTING").unwrap(), vec![other_rule()]);
        for program in ["iptables", "ip6tables"] {
            for table in Table::ALL {
                assert!(fake.chain_in(program, table, CHAIN).is_none(), "{program} {table:?}");
                assert_eq!(
                    fake.chain_in(program, table, table.hook()).unwrap().len(),
                    usize::from(program == "iptables" && table == Table::Nat)
                );
            }
        }
        assert_eq!(uninstall(fake).unwrap(), Removed::default());
    }

    #[test]
    fn container_credentials_install_the_local_chain_and_address_and_uninstall_removes_them() {
        let fake = &Fake::new();
        let mut config = config(&["cali+"], &["10.0.0.7", "fd00::2"]);
        config.container_credentials = true;
        assert_eq!(reconcile::ensure(fake, &config).unwrap(), reconcile::Outcome::Changed);
        assert_eq!(
            *fake.addresses.lock().unwrap(),
            ["-4 169.254.170.23/32", "-6 fd00:ec2::23/128"]
        );
        for program in ["iptables", "ip6tables"] {
            let output = fake.chain(program, "OUTPUT").unwrap();
            assert_eq!(output.len(), 1, "{program}: {output:?}");
            assert!(jumps_to(&output[0], LOCAL_CHAIN));
            assert_eq!(fake.chain(program, LOCAL_CHAIN).unwrap().len(), 1);
        }
        fake.commands();
        assert_eq!(
            reconcile::ensure(fake, &config).unwrap(),
            reconcile::Outcome::Unchanged,
            "a second pass finds everything in place"
        );
        assert!(fake.mutations().is_empty());

        // Another writer removes the address: the next pass puts it back.
        fake.addresses.lock().unwrap().clear();
        assert_eq!(reconcile::ensure(fake, &config).unwrap(), reconcile::Outcome::Changed);
        assert_eq!(fake.addresses.lock().unwrap().len(), 2);

        let removed = uninstall(fake).unwrap();
        assert_eq!(removed.jumps, 6, "PREROUTING, OUTPUT and INPUT, in both families");
        assert!(fake.addresses.lock().unwrap().is_empty(), "the address left lo");
        for program in ["iptables", "ip6tables"] {
            assert!(fake.chain(program, LOCAL_CHAIN).is_none());
            assert!(fake.chain(program, "OUTPUT").unwrap().is_empty());
        }
        assert_eq!(uninstall(fake).unwrap(), Removed::default());
    }

    #[test]
    fn turning_container_credentials_off_removes_the_nodes_own_capture() {
        let fake = &Fake::new();
        let mut config = config(&["cali+"], &["10.0.0.7"]);
        config.container_credentials = true;
        reconcile::ensure(fake, &config).unwrap();
        config.container_credentials = false;
        assert_eq!(reconcile::ensure(fake, &config).unwrap(), reconcile::Outcome::Changed);
        assert!(fake.chain("iptables", LOCAL_CHAIN).is_none());
        assert!(fake.chain("iptables", "OUTPUT").unwrap().is_empty());
        let nat = fake.chain("iptables", CHAIN).unwrap();
        assert!(nat.iter().all(|r| !r.join(" ").contains("169.254.170.23")), "{nat:?}");
        assert_eq!(reconcile::ensure(fake, &config).unwrap(), reconcile::Outcome::Unchanged);
    }

    #[test]
    fn uninstall_tolerates_a_node_without_ip6tables() {
        let fake = Fake {
            no_ip6tables: true,
            ..Fake::new()
        };
        assert_eq!(uninstall(&fake).unwrap(), Removed::default());
    }
}
