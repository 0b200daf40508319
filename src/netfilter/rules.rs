//! The capture rules as data: what one family's `PREROUTING` jump and [`CHAIN`] should hold, the argv of
//! each iptables and conntrack command, and the parsing of `iptables -S` listings.
//!
//! Pure: nothing here runs a command or reads the tables; [`super::reconcile`] and [`super::uninstall`]
//! do, with what this file builds.
//!
//! Invariants: every iptables argv waits for the xtables lock and names the `nat` table; every rule we
//! write carries one of our comments and matches only TCP to the instance-metadata address on port 80;
//! exclusions come before any DNAT.

use std::net::IpAddr;

use super::{CHAIN, Family, IMDS_V4, IMDS_V6, Interface};

/// Seconds iptables waits for the xtables lock held by kube-proxy, the CNI or another agent.
const LOCK_WAIT_SECONDS: &str = "5";
const JUMP_COMMENT: &str = "imds-broker: capture instance metadata";
const DNAT_COMMENT: &str = "imds-broker: to the node agent";
const RETURN_COMMENT: &str = "imds-broker: not a pod interface";

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
pub(super) fn nat_rule(op: &str, chain: &str, spec: &[String]) -> Vec<String> {
    let mut argv = nat(&[op, chain]);
    argv.extend(spec.iter().cloned());
    argv
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

pub(super) fn jumps_to_us(spec: &[String]) -> bool {
    spec.windows(2).any(|w| w[0] == "-j" && w[1] == CHAIN)
}

/// `1 <spec…>`: the arguments of `-I PREROUTING` that make the rule the first.
pub(super) fn insert_first(spec: &[String]) -> Vec<String> {
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
