//! The capture rules as data: what one family's hook jumps and [`CHAIN`]s should hold, the argv of each
//! iptables and conntrack command, the `iptables-restore` payload that repairs a table in one
//! transaction, and the parsing of `iptables -S` listings.
//!
//! Two tables, one chain each, both named [`CHAIN`]:
//! - `nat`: jumped to from the first rule of `PREROUTING`, DNATs TCP to the instance-metadata address
//!   arriving on the pod interfaces to the node's IMDS listen address;
//! - `filter`: jumped to from the first rule of `INPUT` for TCP to the node's IMDS listen address, drops
//!   whatever does not arrive on a pod interface (the admin port is not matched, so probes still reach it).
//!
//! Pure: nothing here runs a command or reads the tables; [`super::reconcile`] and [`super::uninstall`]
//! do, with what this file builds.
//!
//! Invariants: every iptables argv waits for the xtables lock and names its table; every rule we write
//! carries one of our comments; exclusions come before any DNAT or RETURN; a repair is one payload that
//! rewrites our whole chain and, only when needed, our jump, so it commits all at once or not at all.

use std::fmt::Write as _;
use std::net::IpAddr;

use super::{CHAIN, Config, Family, IMDS_V4, IMDS_V6, Interface, LOCAL_CHAIN};

/// Seconds iptables waits for the xtables lock held by kube-proxy, the CNI or another agent.
pub(super) const LOCK_WAIT_SECONDS: &str = "5";
const JUMP_COMMENT: &str = "imds-broker: capture instance metadata";
const JUMP_BOTH_COMMENT: &str = "imds-broker: capture instance metadata and container credentials";
const LOCAL_JUMP_COMMENT: &str = "imds-broker: container credentials from the node";
const LOCAL_COMMENT: &str = "imds-broker: node's container credentials";
const DNAT_COMMENT: &str = "imds-broker: to the node agent";
const RETURN_COMMENT: &str = "imds-broker: not a pod interface";
const GUARD_COMMENT: &str = "imds-broker: guard the IMDS port";
const POD_COMMENT: &str = "imds-broker: from a pod interface";
const DROP_COMMENT: &str = "imds-broker: IMDS port, not from a pod interface";

/// A table in which we own [`CHAIN`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    /// The capture: `PREROUTING` → DNAT.
    Nat,
    /// The guard of the IMDS listen port: `INPUT` → drop what is not from a pod interface.
    Filter,
}

impl Table {
    /// Both tables, `nat` first (the order of install and uninstall).
    pub const ALL: [Table; 2] = [Table::Nat, Table::Filter];

    /// The name iptables takes after `-t` and `iptables-restore` after `*`.
    pub fn name(self) -> &'static str {
        match self {
            Table::Nat => "nat",
            Table::Filter => "filter",
        }
    }

    /// The built-in chain whose first rule jumps to ours.
    pub fn hook(self) -> &'static str {
        match self {
            Table::Nat => "PREROUTING",
            Table::Filter => "INPUT",
        }
    }
}

/// What one of our chains should hold: the jump at the top of its hook and the chain's contents, as
/// rule specs (what follows `-A <chain>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// The table.
    pub table: Table,
    /// The built-in chain whose first rule jumps to ours.
    pub hook: &'static str,
    /// Our chain's name ([`CHAIN`], or [`LOCAL_CHAIN`] in `nat`'s `OUTPUT`).
    pub name: &'static str,
    /// The first rule of the table's hook.
    pub jump: Vec<String>,
    /// The rules of [`CHAIN`] in this table, in order.
    pub rules: Vec<Vec<String>>,
}

/// The rules one family should have, per table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    /// The family these rules are for.
    pub family: Family,
    /// The capture in `nat`.
    pub nat: Chain,
    /// The guard of the IMDS port in `filter`.
    pub filter: Chain,
    /// With `--container-credentials`: the node's own (hostNetwork pods') container-credentials traffic,
    /// DNATed in `nat`'s `OUTPUT`.
    pub local: Option<Chain>,
}

impl Rules {
    /// Every chain's rules, `nat` first.
    pub fn chains(&self) -> Vec<&Chain> {
        [&self.nat, &self.filter]
            .into_iter()
            .chain(self.local.as_ref())
            .collect()
    }
}

/// The rules `config` asks for, for `node_ip`'s family.
pub fn capture(config: &Config, node_ip: IpAddr) -> Rules {
    build(&config.interfaces, node_ip, config.port, config.container_credentials)
}

/// Builds the rules sending `family`'s metadata traffic to `node_ip:port` and guarding that port.
///
/// Exclusions (`!eth0`) become `RETURN` (nat) and `DROP` (filter) rules placed first, so several of them
/// combine with AND; then one DNAT (nat) and one `RETURN` (filter) per included pattern, or a single one
/// for every other interface when only exclusions are given. With included patterns the filter chain ends
/// in a `DROP`: the IMDS port answers pod interfaces only, not the node's other interfaces nor loopback.
pub fn rules(interfaces: &[Interface], node_ip: IpAddr, port: u16) -> Rules {
    build(interfaces, node_ip, port, false)
}

/// [`rules`], and with `container` the container-credentials address too: the same DNATs and
/// exclusions for it in `PREROUTING` (whose jump then matches port 80 to any address, our chain telling
/// the two apart), the node's own traffic to it DNATed in `OUTPUT` ([`LOCAL_CHAIN`]), and the guard
/// letting that traffic in from `lo`, and only what was DNATed from the container-credentials address.
fn build(interfaces: &[Interface], node_ip: IpAddr, port: u16, container: bool) -> Rules {
    let family = Family::of(node_ip);
    let (to, node) = match node_ip {
        IpAddr::V4(ip) => (format!("{ip}:{port}"), format!("{ip}/32")),
        IpAddr::V6(ip) => (format!("[{ip}]:{port}"), format!("{ip}/128")),
    };
    let port = port.to_string();
    let matching = |destination: &str, dport: &str, interface: Option<&str>, comment: &str| {
        let mut spec = strings(&["-d", destination]);
        if let Some(name) = interface {
            spec.extend(strings(&["-i", name]));
        }
        spec.extend(strings(&[
            "-p",
            "tcp",
            "-m",
            "tcp",
            "--dport",
            dport,
            "-m",
            "comment",
            "--comment",
            comment,
        ]));
        spec
    };
    let imds = family.imds();
    let with_target = |mut spec: Vec<String>, target: &[&str]| {
        spec.extend(strings(target));
        spec
    };
    let excluded: Vec<&Interface> = interfaces.iter().filter(|i| i.negated).collect();
    let included: Vec<&Interface> = interfaces.iter().filter(|i| !i.negated).collect();

    let container_address = family.container();
    let destinations: Vec<&str> = std::iter::once(imds.as_str())
        .chain(container.then_some(container_address.as_str()))
        .collect();

    let mut nat = Vec::new();
    let mut filter = Vec::new();
    if container {
        // The node's own connections to the container-credentials address, DNATed in OUTPUT, arrive on
        // `lo`: let in those, and no other local traffic, before any DROP.
        let mut spec = matching(&node, &port, Some("lo"), LOCAL_JUMP_COMMENT);
        spec.extend(strings(&[
            "-m",
            "conntrack",
            "--ctstate",
            "DNAT",
            "--ctorigdst",
            &container_address,
            "-j",
            "RETURN",
        ]));
        filter.push(spec);
    }
    for interface in &excluded {
        let name = Some(interface.name.as_str());
        for destination in &destinations {
            nat.push(with_target(
                matching(destination, "80", name, RETURN_COMMENT),
                &["-j", "RETURN"],
            ));
        }
        filter.push(with_target(matching(&node, &port, name, DROP_COMMENT), &["-j", "DROP"]));
    }
    let dnat = ["-j", "DNAT", "--to-destination", &to];
    if included.is_empty() {
        for destination in &destinations {
            nat.push(with_target(matching(destination, "80", None, DNAT_COMMENT), &dnat));
        }
        filter.push(with_target(
            matching(&node, &port, None, POD_COMMENT),
            &["-j", "RETURN"],
        ));
    }
    for interface in &included {
        let name = Some(interface.name.as_str());
        for destination in &destinations {
            nat.push(with_target(matching(destination, "80", name, DNAT_COMMENT), &dnat));
        }
        filter.push(with_target(
            matching(&node, &port, name, POD_COMMENT),
            &["-j", "RETURN"],
        ));
    }
    if !included.is_empty() {
        filter.push(with_target(matching(&node, &port, None, DROP_COMMENT), &["-j", "DROP"]));
    }
    let nat_jump = if container {
        // Port 80 to either address: no `-d`, our chain's rules name both.
        let mut spec = strings(&["-p", "tcp", "-m", "tcp", "--dport", "80"]);
        spec.extend(strings(&["-m", "comment", "--comment", JUMP_BOTH_COMMENT, "-j", CHAIN]));
        spec
    } else {
        with_target(matching(&imds, "80", None, JUMP_COMMENT), &["-j", CHAIN])
    };
    let local = container.then(|| Chain {
        table: Table::Nat,
        hook: "OUTPUT",
        name: LOCAL_CHAIN,
        jump: with_target(
            matching(&container_address, "80", None, LOCAL_JUMP_COMMENT),
            &["-j", LOCAL_CHAIN],
        ),
        rules: vec![with_target(
            matching(&container_address, "80", None, LOCAL_COMMENT),
            &dnat,
        )],
    });
    Rules {
        family,
        nat: Chain {
            table: Table::Nat,
            hook: Table::Nat.hook(),
            name: CHAIN,
            jump: nat_jump,
            rules: nat,
        },
        filter: Chain {
            table: Table::Filter,
            hook: Table::Filter.hook(),
            name: CHAIN,
            jump: with_target(matching(&node, &port, None, GUARD_COMMENT), &["-j", CHAIN]),
            rules: filter,
        },
        local,
    }
}

/// What a reconcile pass read of one table before deciding.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// Our chain's rules as listed, `None` when the chain does not exist.
    pub chain: Option<Vec<Vec<String>>>,
    /// The hook's rules as listed.
    pub hook: Vec<Vec<String>>,
    /// Whether iptables found every wanted rule of our chain (`-C`); only asked when the shapes match.
    pub chain_checked: bool,
    /// Whether iptables found the wanted jump (`-C`); only asked when it is alone and first.
    pub jump_checked: bool,
}

/// Whether the listed chain has the wanted shape, so asking iptables about each rule is worth it.
pub(super) fn chain_shaped(wanted: &Chain, present: Option<&[Vec<String>]>) -> bool {
    present.is_some_and(|present| {
        present.len() == wanted.rules.len()
            && present
                .iter()
                .zip(&wanted.rules)
                .all(|(have, want)| fingerprint(have) == fingerprint(want))
    })
}

/// Whether the hook holds exactly one jump to `chain`, as its first rule.
pub(super) fn jump_shaped(hook: &[Vec<String>], chain: &str) -> bool {
    hook.iter().filter(|spec| jumps_to(spec, chain)).count() == 1 && hook.first().is_some_and(|r| jumps_to(r, chain))
}

/// The `iptables-restore --noflush` payload that puts `wanted` in place, or `None` when it already is.
///
/// The payload declares [`CHAIN`] (which, with `--noflush`, creates it or empties it) and appends every
/// wanted rule; when the jump is missing, duplicated, displaced or changed it also deletes each of our
/// jumps by its listed spec and inserts the wanted one first. `iptables-restore` commits a table at once
/// (one replace of the table for the legacy backend, one netlink transaction for nft), so packets see the
/// old table or the new one and never a state in between; the order of lines inside only matters to
/// iptables itself: deleting before inserting keeps `-D`, which removes the first matching rule, from
/// hitting the new jump. If any line fails (a rule another writer removed meanwhile, a lock timeout),
/// nothing at all changes and the capture stays as it was.
pub fn repair(wanted: &Chain, observed: &Observed) -> Option<String> {
    let chain_ok = observed.chain_checked && chain_shaped(wanted, observed.chain.as_deref());
    let jump_ok = observed.jump_checked && jump_shaped(&observed.hook, wanted.name);
    if chain_ok && jump_ok {
        return None;
    }
    let (hook, chain) = (wanted.hook, wanted.name);
    let mut payload = format!("*{}\n:{chain} - [0:0]\n", wanted.table.name());
    for spec in &wanted.rules {
        line(&mut payload, &["-A", chain], spec);
    }
    if !jump_ok {
        for spec in observed.hook.iter().filter(|spec| jumps_to(spec, chain)) {
            line(&mut payload, &["-D", hook], spec);
        }
        line(&mut payload, &["-I", hook, "1"], &wanted.jump);
    }
    payload.push_str("COMMIT\n");
    Some(payload)
}

/// Appends one restore line, quoting what `iptables-restore` would otherwise split or unescape.
fn line(payload: &mut String, head: &[&str], spec: &[String]) {
    let mut words: Vec<String> = strings(head);
    words.extend(spec.iter().map(|arg| {
        if !arg.is_empty() && !arg.contains(|c: char| c.is_whitespace() || c == '"' || c == '\\' || c == '\'') {
            arg.clone()
        } else {
            format!("\"{}\"", arg.replace('\\', "\\\\").replace('"', "\\\""))
        }
    }));
    let _ = writeln!(payload, "{}", words.join(" "));
}

/// The argv of an iptables command on `table`, waiting for the xtables lock.
pub fn argv(table: Table, args: &[&str]) -> Vec<String> {
    let mut argv = strings(&["-w", LOCK_WAIT_SECONDS, "-t", table.name()]);
    argv.extend(strings(args));
    argv
}

/// The argv of `<op> <chain> <spec…>` on `table`.
pub(super) fn rule_argv(table: Table, op: &str, chain: &str, spec: &[String]) -> Vec<String> {
    let mut argv = argv(table, &[op, chain]);
    argv.extend(spec.iter().cloned());
    argv
}

/// The argv of `iptables-restore`: wait for the lock, change only what the payload names.
pub fn restore_argv() -> Vec<String> {
    strings(&["-w", LOCK_WAIT_SECONDS, "--noflush"])
}

pub(super) fn strings(items: &[&str]) -> Vec<String> {
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
pub(super) fn listed_rules(listing: &str, chain: &str) -> Vec<Vec<String>> {
    listing
        .lines()
        .map(split_rule)
        .filter(|args| args.len() >= 2 && args[0] == "-A" && args[1] == chain)
        .map(|args| args[2..].to_vec())
        .collect()
}

/// What tells two of our chain's rules apart, read from a spec: the interface match and the target.
pub(super) fn fingerprint(spec: &[String]) -> (Option<(bool, &str)>, Option<&str>) {
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

/// Whether a rule jumps to [`CHAIN`].
#[cfg(test)]
pub(super) fn jumps_to_us(spec: &[String]) -> bool {
    jumps_to(spec, CHAIN)
}

/// Whether a rule jumps to `chain`.
pub(super) fn jumps_to(spec: &[String], chain: &str) -> bool {
    spec.windows(2).any(|w| w[0] == "-j" && w[1] == chain)
}

/// The argv that deletes the conntrack entries of connections that reached the metadata address itself.
///
/// Only entries whose reply comes from the metadata address, i.e. that were not DNATed: those are the
/// connections that got past the capture (opened before it existed, or while someone else had removed
/// it). Entries DNATed to the agent are kept: deleting a live connection's entry makes its next packets
/// look new mid-stream, which breaks it, and in the e2e decoy test also let a connection now and then
/// reach the address itself (about 1 in 100 flushes); without that deletion none did.
pub fn conntrack_flush(family: Family) -> Vec<String> {
    let (name, imds) = match family {
        Family::V4 => ("ipv4", IMDS_V4.to_string()),
        Family::V6 => ("ipv6", IMDS_V6.to_string()),
    };
    strings(&["-D", "-f", name, "-d", &imds, "--reply-src", &imds])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netfilter::fake::config;

    #[test]
    fn rules_dnat_each_included_interface_to_the_node() {
        let config = config(&["cali+", "cni0"], &["10.0.0.7"]);
        let rules = rules(&config.interfaces, config.node_ips[0], config.port);
        assert_eq!(rules.family, Family::V4);
        assert_eq!(
            rules.nat.jump.join(" "),
            "-d 169.254.169.254/32 -p tcp -m tcp --dport 80 -m comment --comment \
             imds-broker: capture instance metadata -j IMDS-BROKER"
        );
        let chain: Vec<String> = rules.nat.rules.iter().map(|r| r.join(" ")).collect();
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
        let shape: Vec<_> = rules.nat.rules.iter().map(|r| fingerprint(r)).collect();
        assert_eq!(
            shape,
            [
                (Some((false, "eth0")), Some("RETURN")),
                (Some((false, "eth1")), Some("RETURN")),
                (None, Some("DNAT")),
            ]
        );
        let guard: Vec<_> = rules.filter.rules.iter().map(|r| fingerprint(r)).collect();
        assert_eq!(
            guard,
            [
                (Some((false, "eth0")), Some("DROP")),
                (Some((false, "eth1")), Some("DROP")),
                (None, Some("RETURN")),
            ]
        );
    }

    #[test]
    fn ipv6_rules_use_the_ipv6_metadata_address_and_bracketed_target() {
        let config = config(&["eni+"], &["fd00::2"]);
        let rules = rules(&config.interfaces, config.node_ips[0], config.port);
        assert_eq!(rules.family, Family::V6);
        let dnat = rules.nat.rules[0].join(" ");
        assert!(dnat.starts_with("-d fd00:ec2::254/128 -i eni+"), "{dnat}");
        assert!(dnat.ends_with("--to-destination [fd00::2]:8181"), "{dnat}");
    }

    fn with_container(interfaces: &[&str], node: &str) -> Rules {
        let mut config = config(interfaces, &[node]);
        config.container_credentials = true;
        capture(&config, config.node_ips[0])
    }

    #[test]
    fn container_credentials_are_captured_on_the_same_interfaces_by_the_same_chain() {
        let rules = with_container(&["cali+", "!eth0"], "10.0.0.7");
        assert_eq!(
            rules.nat.jump.join(" "),
            "-p tcp -m tcp --dport 80 -m comment --comment \
             imds-broker: capture instance metadata and container credentials -j IMDS-BROKER"
        );
        let chain: Vec<String> = rules.nat.rules.iter().map(|r| r.join(" ")).collect();
        assert_eq!(
            chain,
            [
                "-d 169.254.169.254/32 -i eth0 -p tcp -m tcp --dport 80 -m comment --comment \
                 imds-broker: not a pod interface -j RETURN",
                "-d 169.254.170.23/32 -i eth0 -p tcp -m tcp --dport 80 -m comment --comment \
                 imds-broker: not a pod interface -j RETURN",
                "-d 169.254.169.254/32 -i cali+ -p tcp -m tcp --dport 80 -m comment --comment \
                 imds-broker: to the node agent -j DNAT --to-destination 10.0.0.7:8181",
                "-d 169.254.170.23/32 -i cali+ -p tcp -m tcp --dport 80 -m comment --comment \
                 imds-broker: to the node agent -j DNAT --to-destination 10.0.0.7:8181",
            ]
        );
        let local = rules.local.expect("the node's own traffic has a chain");
        assert_eq!(
            (local.table, local.hook, local.name),
            (Table::Nat, "OUTPUT", LOCAL_CHAIN)
        );
        assert_eq!(
            local.jump.join(" "),
            "-d 169.254.170.23/32 -p tcp -m tcp --dport 80 -m comment --comment \
             imds-broker: container credentials from the node -j IMDS-BROKER-LOCAL"
        );
        assert_eq!(
            local.rules.iter().map(|r| r.join(" ")).collect::<Vec<_>>(),
            ["-d 169.254.170.23/32 -p tcp -m tcp --dport 80 -m comment --comment \
              imds-broker: node's container credentials -j DNAT --to-destination 10.0.0.7:8181"]
        );
        // The guard lets in from `lo` only what was DNATed from the container-credentials address,
        // before the DROP that keeps the port for pod interfaces.
        let guard: Vec<String> = rules.filter.rules.iter().map(|r| r.join(" ")).collect();
        assert_eq!(
            guard[0],
            "-d 10.0.0.7/32 -i lo -p tcp -m tcp --dport 8181 -m comment --comment \
             imds-broker: container credentials from the node -m conntrack --ctstate DNAT \
             --ctorigdst 169.254.170.23/32 -j RETURN"
        );
        assert_eq!(fingerprint(rules.filter.rules.last().unwrap()), (None, Some("DROP")));
    }

    #[test]
    fn container_credentials_over_ipv6_use_fd00_ec2_23() {
        let rules = with_container(&["eni+"], "fd00::2");
        let chain: Vec<String> = rules.nat.rules.iter().map(|r| r.join(" ")).collect();
        assert!(chain[1].starts_with("-d fd00:ec2::23/128 -i eni+"), "{chain:?}");
        let local = rules.local.unwrap();
        assert!(local.rules[0].join(" ").ends_with("--to-destination [fd00::2]:8181"));
    }

    #[test]
    fn without_container_credentials_nothing_about_them_is_written() {
        let rules = capture(&config(&["cali+"], &["10.0.0.7"]), "10.0.0.7".parse().unwrap());
        assert!(rules.local.is_none());
        assert_eq!(rules.chains().len(), 2);
        let all: Vec<String> = rules
            .chains()
            .iter()
            .flat_map(|c| c.rules.iter().map(|r| r.join(" ")))
            .collect();
        assert!(
            all.iter().all(|r| !r.contains("169.254.170.23") && !r.contains(" lo ")),
            "{all:?}"
        );
    }

    #[test]
    fn the_imds_port_answers_only_the_pod_interfaces() {
        let config = config(&["cali+", "cni0"], &["10.0.0.7"]);
        let rules = rules(&config.interfaces, config.node_ips[0], config.port);
        assert_eq!(rules.filter.table.hook(), "INPUT");
        assert_eq!(
            rules.filter.jump.join(" "),
            "-d 10.0.0.7/32 -p tcp -m tcp --dport 8181 -m comment --comment \
             imds-broker: guard the IMDS port -j IMDS-BROKER"
        );
        let shape: Vec<_> = rules.filter.rules.iter().map(|r| fingerprint(r)).collect();
        assert_eq!(
            shape,
            [
                (Some((false, "cali+")), Some("RETURN")),
                (Some((false, "cni0")), Some("RETURN")),
                (None, Some("DROP")),
            ]
        );
        assert!(rules.filter.rules.iter().all(|r| r.join(" ").contains("--dport 8181")));
    }

    fn observed(chain: Option<Vec<Vec<String>>>, hook: Vec<Vec<String>>, checked: bool) -> Observed {
        Observed {
            chain,
            hook,
            chain_checked: checked,
            jump_checked: checked,
        }
    }

    #[test]
    fn nothing_to_repair_means_no_payload() {
        let wanted = rules(
            &config(&["cali+"], &["10.0.0.7"]).interfaces,
            "10.0.0.7".parse().unwrap(),
            8181,
        )
        .nat;
        let seen = observed(Some(wanted.rules.clone()), vec![wanted.jump.clone(), other()], true);
        assert_eq!(repair(&wanted, &seen), None);
    }

    #[test]
    fn a_fresh_install_is_one_payload_creating_the_chain_then_the_jump() {
        let wanted = rules(
            &config(&["cali+"], &["10.0.0.7"]).interfaces,
            "10.0.0.7".parse().unwrap(),
            8181,
        )
        .nat;
        let payload = repair(&wanted, &observed(None, vec![other()], false)).unwrap();
        assert_eq!(
            payload,
            "*nat\n\
             :IMDS-BROKER - [0:0]\n\
             -A IMDS-BROKER -d 169.254.169.254/32 -i cali+ -p tcp -m tcp --dport 80 -m comment --comment \
             \"imds-broker: to the node agent\" -j DNAT --to-destination 10.0.0.7:8181\n\
             -I PREROUTING 1 -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -m comment --comment \
             \"imds-broker: capture instance metadata\" -j IMDS-BROKER\n\
             COMMIT\n"
        );
    }

    #[test]
    fn a_displaced_or_duplicated_jump_is_deleted_and_reinserted_in_the_same_payload() {
        let wanted = rules(
            &config(&["cali+"], &["10.0.0.7"]).interfaces,
            "10.0.0.7".parse().unwrap(),
            8181,
        )
        .nat;
        for hook in [
            vec![other(), wanted.jump.clone()],
            vec![wanted.jump.clone(), other(), wanted.jump.clone()],
        ] {
            let payload = repair(&wanted, &observed(Some(wanted.rules.clone()), hook.clone(), true)).unwrap();
            let lines: Vec<&str> = payload.lines().collect();
            let deletes = lines.iter().filter(|l| l.starts_with("-D PREROUTING ")).count();
            assert_eq!(deletes, hook.iter().filter(|r| jumps_to_us(r)).count(), "{payload}");
            let insert = lines.iter().position(|l| l.starts_with("-I PREROUTING 1 ")).unwrap();
            assert_eq!(insert, lines.len() - 2, "the insert follows the deletes, before COMMIT");
            assert_eq!(
                lines[1], ":IMDS-BROKER - [0:0]",
                "the chain is rewritten in the same commit"
            );
            assert!(
                !payload.contains("-s 10.0.0.0/8"),
                "never touches rules that are not ours"
            );
            let parsed: Vec<Vec<String>> = lines[lines.len() - 2..lines.len() - 1]
                .iter()
                .map(|l| split_rule(l))
                .collect();
            assert_eq!(
                parsed[0][3..],
                wanted.jump[..],
                "the restore line parses back to the jump"
            );
        }
    }

    #[test]
    fn a_changed_chain_is_rewritten_without_touching_a_correct_jump() {
        let wanted = rules(
            &config(&["cali+", "!eth0"], &["10.0.0.7"]).interfaces,
            "10.0.0.7".parse().unwrap(),
            8181,
        )
        .nat;
        let mut changed = wanted.rules.clone();
        changed.reverse();
        let payload = repair(&wanted, &observed(Some(changed), vec![wanted.jump.clone()], true)).unwrap();
        assert!(!payload.contains("PREROUTING"), "{payload}");
        assert_eq!(payload.lines().filter(|l| l.starts_with("-A IMDS-BROKER ")).count(), 2);
    }

    fn other() -> Vec<String> {
        strings(&["-s", "10.0.0.0/8", "-j", "RETURN"])
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
}
