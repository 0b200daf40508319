//! Test support for this component: an in-memory `nat` and `filter` table per program behind the
//! [`Backend`] trait, and the fixtures the tests of `netfilter` share.
//!
//! Compiled for tests only. It understands exactly the commands and restore payloads this component
//! sends and checks that each command waits for the xtables lock and names its table; a restore applies
//! to a copy of the table that replaces the original only if every line succeeded, as the kernel's
//! commit does. It does not model iptables' matching or its printed form beyond the quoting
//! `iptables -S` applies.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use super::rules::{LOCK_WAIT_SECONDS, split_rule, strings};
use super::{Backend, Config, Error, Family, Interface, Program, Table};

/// Chains of one table, by name.
type Chains = BTreeMap<String, Vec<Vec<String>>>;

/// In-memory tables per program that understand the commands this component sends.
#[derive(Default)]
pub(super) struct Fake {
    /// Each program's tables.
    pub(super) tables: Mutex<BTreeMap<(&'static str, Table), Chains>>,
    /// Every command run, as `program args…`; a restore as `<program>-restore <payload>`.
    pub(super) log: Mutex<Vec<String>>,
    /// Whether `ip6tables` is missing, as on a node without IPv6 tooling.
    pub(super) no_ip6tables: bool,
    /// Whether every restore fails, as on a lock timeout.
    pub(super) restore_fails: bool,
    /// Addresses on `lo` added through `ip`, as `-4 169.254.170.23/32`.
    pub(super) addresses: Mutex<Vec<String>>,
}

impl Fake {
    /// Both families' tables, each with an empty hook chain.
    pub(super) fn new() -> Self {
        let fake = Self::default();
        for program in ["iptables", "ip6tables"] {
            for table in Table::ALL {
                let mut chains = BTreeMap::new();
                chains.insert(table.hook().to_owned(), Vec::new());
                if table == Table::Nat {
                    chains.insert("OUTPUT".to_owned(), Vec::new());
                }
                fake.tables.lock().unwrap().insert((program, table), chains);
            }
        }
        fake
    }

    /// The rules of `chain` in `program`'s `nat` table, if it exists.
    pub(super) fn chain(&self, program: &'static str, chain: &str) -> Option<Vec<Vec<String>>> {
        self.chain_in(program, Table::Nat, chain)
    }

    /// The rules of `chain` in `program`'s `table`, if it exists.
    pub(super) fn chain_in(&self, program: &'static str, table: Table, chain: &str) -> Option<Vec<Vec<String>>> {
        self.tables.lock().unwrap()[&(program, table)].get(chain).cloned()
    }

    /// Replaces (or creates) `chain` in `program`'s `nat` table, as another writer would.
    pub(super) fn set_chain(&self, program: &'static str, chain: &str, rules: Vec<Vec<String>>) {
        self.set_chain_in(program, Table::Nat, chain, rules);
    }

    /// Replaces (or creates) `chain` in `program`'s `table`, as another writer would.
    pub(super) fn set_chain_in(&self, program: &'static str, table: Table, chain: &str, rules: Vec<Vec<String>>) {
        self.tables
            .lock()
            .unwrap()
            .get_mut(&(program, table))
            .unwrap()
            .insert(chain.to_owned(), rules);
    }

    /// Every command run since the last call, as `program args…`.
    pub(super) fn commands(&self) -> Vec<String> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }

    /// The commands since the last call that write (all but `-S`, `-C` and `ip addr show`).
    pub(super) fn mutations(&self) -> Vec<String> {
        self.commands()
            .into_iter()
            .filter(|c| !c.contains(" -S ") && !c.contains(" -C ") && !c.contains(" addr show "))
            .collect()
    }
}

impl Fake {
    /// `ip -o -4 addr show dev lo to X`, `ip -4 addr add X dev lo scope host`, `ip -4 addr del X dev lo`.
    fn ip(&self, args: &[String]) -> Result<String, ()> {
        let mut addresses = self.addresses.lock().unwrap();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        match args[..] {
            ["-o", family, "addr", "show", "dev", "lo", "to", address] => {
                let key = format!("{family} {address}");
                Ok(if addresses.contains(&key) {
                    format!("1: lo    inet {address} scope host lo\n")
                } else {
                    String::new()
                })
            }
            [family, "addr", "add", address, "dev", "lo", "scope", "host"] => {
                let key = format!("{family} {address}");
                if addresses.contains(&key) {
                    return Err(());
                }
                addresses.push(key);
                Ok(String::new())
            }
            [family, "addr", "del", address, "dev", "lo"] => {
                let key = format!("{family} {address}");
                let at = addresses.iter().position(|a| *a == key).ok_or(())?;
                addresses.remove(at);
                Ok(String::new())
            }
            _ => panic!("unexpected ip command {args:?}"),
        }
    }
}

/// A non-zero exit of `program`, as iptables reports a missing chain or rule.
fn failed(program: Program, args: &[String]) -> Error {
    Error::Failed {
        program: program.binary(),
        args: args.join(" "),
        code: Some(1),
        stderr: "no".to_owned(),
    }
}

/// Applies one iptables operation to `chains`; `Err(())` where iptables would exit non-zero.
fn apply(chains: &mut Chains, op: &str, chain: &str, rest: &[String]) -> Result<String, ()> {
    match op {
        "-S" => {
            let rules = chains.get(chain).ok_or(())?;
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
        "-N" if chains.contains_key(chain) => Err(()),
        "-N" => {
            chains.insert(chain.to_owned(), Vec::new());
            Ok(String::new())
        }
        "-F" => {
            chains.get_mut(chain).ok_or(())?.clear();
            Ok(String::new())
        }
        "-X" => chains.remove(chain).map(|_| String::new()).ok_or(()),
        "-A" => {
            chains.get_mut(chain).ok_or(())?.push(rest.to_vec());
            Ok(String::new())
        }
        "-I" => {
            let position: usize = rest[0].parse().unwrap();
            chains
                .get_mut(chain)
                .ok_or(())?
                .insert(position - 1, rest[1..].to_vec());
            Ok(String::new())
        }
        "-C" => chains
            .get(chain)
            .filter(|rules| rules.iter().any(|r| r == rest))
            .map(|_| String::new())
            .ok_or(()),
        "-D" => {
            let rules = chains.get_mut(chain).ok_or(())?;
            let at = rules.iter().position(|r| r == rest).ok_or(())?;
            rules.remove(at);
            Ok(String::new())
        }
        other => panic!("unexpected iptables operation {other}"),
    }
}

fn table_named(name: &str) -> Table {
    Table::ALL
        .into_iter()
        .find(|t| t.name() == name)
        .unwrap_or_else(|| panic!("unexpected table {name}"))
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
        if program == Program::Ip {
            return self.ip(args).map_err(|()| failed(program, args));
        }
        if program == Program::Ip6tables && self.no_ip6tables {
            return Err(Error::Spawn {
                program: program.binary(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
        assert_eq!(
            &args[..3],
            &strings(&["-w", LOCK_WAIT_SECONDS, "-t"])[..],
            "every command waits for the lock and names its table"
        );
        let table = table_named(&args[3]);
        let mut tables = self.tables.lock().unwrap();
        let chains = tables.get_mut(&(program.binary(), table)).unwrap();
        apply(chains, &args[4], &args[5], &args[6..]).map_err(|()| failed(program, args))
    }

    fn restore(&self, family: Family, table: Table, payload: &str) -> Result<(), Error> {
        let program = family.restore_program();
        self.log.lock().unwrap().push(format!(
            "{} {}",
            program.binary(),
            payload.trim_end().replace('\n', " | ")
        ));
        let error = || failed(program, &[payload.to_owned()]);
        if self.restore_fails {
            return Err(error());
        }
        let mut lines = payload.lines();
        assert_eq!(
            lines.next(),
            Some(format!("*{}", table.name()).as_str()),
            "one table per payload"
        );
        let key = (family.program().binary(), table);
        let mut tables = self.tables.lock().unwrap();
        // The commit: a copy that replaces the table only when every line applied.
        let mut chains = tables[&key].clone();
        let mut committed = false;
        for line in lines {
            assert!(!committed, "nothing after COMMIT");
            if line == "COMMIT" {
                committed = true;
            } else if let Some(declared) = line.strip_prefix(':') {
                // With --noflush, declaring a chain creates it or empties it.
                let name = declared.split_whitespace().next().unwrap();
                chains.insert(name.to_owned(), Vec::new());
            } else {
                let args = split_rule(line);
                apply(&mut chains, &args[0], &args[1], &args[2..]).map_err(|()| error())?;
            }
        }
        assert!(committed, "a payload ends in COMMIT");
        tables.insert(key, chains);
        Ok(())
    }
}

/// A config capturing `interfaces` towards `node_ips`, port 8181.
pub(super) fn config(interfaces: &[&str], node_ips: &[&str]) -> Config {
    Config {
        interfaces: interfaces.iter().map(|i| Interface::parse(i).unwrap()).collect(),
        node_ips: node_ips.iter().map(|ip| ip.parse().unwrap()).collect(),
        port: 8181,
        reconcile_interval: Duration::from_secs(30),
        container_credentials: false,
    }
}

/// A rule of someone else's in `PREROUTING`.
pub(super) fn other_rule() -> Vec<String> {
    strings(&["-s", "10.0.0.0/8", "-j", "RETURN"])
}
