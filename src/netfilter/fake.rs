//! Test support for this component: an in-memory `nat` table per program behind the [`Backend`] trait,
//! and the fixtures the tests of `netfilter` share.
//!
//! Compiled for tests only. It understands exactly the commands this component sends and checks that
//! each waits for the xtables lock on the `nat` table; it does not model iptables' matching or its
//! printed form beyond the quoting `iptables -S` applies.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use super::rules::strings;
use super::{Backend, Config, Error, Interface, Program, nat};

/// Chains of one `nat` table, by name.
type Table = BTreeMap<String, Vec<Vec<String>>>;

/// An in-memory `nat` table per program that understands the commands this component sends.
#[derive(Default)]
pub(super) struct Fake {
    /// Each program's table.
    pub(super) tables: Mutex<BTreeMap<&'static str, Table>>,
    /// Every command run, as `program args…`.
    pub(super) log: Mutex<Vec<String>>,
    /// Whether `ip6tables` is missing, as on a node without IPv6 tooling.
    pub(super) no_ip6tables: bool,
}

impl Fake {
    /// Both families' tables, each with an empty `PREROUTING`.
    pub(super) fn new() -> Self {
        let fake = Self::default();
        for program in ["iptables", "ip6tables"] {
            let mut table = BTreeMap::new();
            table.insert("PREROUTING".to_owned(), Vec::new());
            fake.tables.lock().unwrap().insert(program, table);
        }
        fake
    }

    /// The rules of `chain` in `program`'s table, if it exists.
    pub(super) fn chain(&self, program: &'static str, chain: &str) -> Option<Vec<Vec<String>>> {
        self.tables.lock().unwrap()[program].get(chain).cloned()
    }

    /// Replaces (or creates) `chain` in `program`'s table, as another writer would.
    pub(super) fn set_chain(&self, program: &'static str, chain: &str, rules: Vec<Vec<String>>) {
        self.tables
            .lock()
            .unwrap()
            .get_mut(program)
            .unwrap()
            .insert(chain.to_owned(), rules);
    }

    /// Every command run since the last call, as `program args…`.
    pub(super) fn commands(&self) -> Vec<String> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }

    /// The commands since the last call that write (all but `-S` and `-C`).
    pub(super) fn mutations(&self) -> Vec<String> {
        self.commands()
            .into_iter()
            .filter(|c| !c.contains(" -S ") && !c.contains(" -C "))
            .collect()
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

/// A config capturing `interfaces` towards `node_ips`, port 8181.
pub(super) fn config(interfaces: &[&str], node_ips: &[&str]) -> Config {
    Config {
        interfaces: interfaces.iter().map(|i| Interface::parse(i).unwrap()).collect(),
        node_ips: node_ips.iter().map(|ip| ip.parse().unwrap()).collect(),
        port: 8181,
        reconcile_interval: Duration::from_secs(30),
    }
}

/// A rule of someone else's in `PREROUTING`.
pub(super) fn other_rule() -> Vec<String> {
    strings(&["-s", "10.0.0.0/8", "-j", "RETURN"])
}
