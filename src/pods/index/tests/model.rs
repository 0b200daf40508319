//! A property test of the index against a model that recomputes every answer from scratch.

use super::*;
use proptest::prelude::*;

const IPS: [&str; 3] = ["10.0.0.1", "10.0.0.2", "10.0.0.3"];

#[derive(Debug, Clone)]
struct Spec {
    uid: usize,
    ips: Vec<usize>,
    phase: &'static str,
    terminating: bool,
    host_network: bool,
    /// None: no container status; Some((running, started before boot)).
    container: Option<(bool, bool)>,
    /// False: the object could not be decoded; only its uid and addresses are read.
    readable: bool,
}

#[derive(Debug, Clone)]
enum Step {
    Apply(Spec),
    Delete(usize),
    Relist(Vec<Spec>),
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        0..5usize,
        proptest::collection::vec(0..IPS.len(), 0..3),
        proptest::sample::select(vec!["Pending", "Running", "Running", "Succeeded", "Failed"]),
        any::<bool>(),
        proptest::bool::weighted(0.1),
        proptest::option::of((any::<bool>(), proptest::bool::weighted(0.3))),
        proptest::bool::weighted(0.85),
    )
        .prop_map(
            |(uid, ips, phase, terminating, host_network, container, readable)| Spec {
                uid,
                ips,
                phase,
                terminating,
                host_network,
                container,
                readable,
            },
        )
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => spec().prop_map(Step::Apply),
        2 => (0..5usize).prop_map(Step::Delete),
        1 => proptest::collection::vec(spec(), 0..4).prop_map(Step::Relist),
    ]
}

fn unreadable(s: &Spec) -> Unreadable {
    Unreadable {
        uid: Some(format!("uid-{}", s.uid)),
        name: Some(format!("p{}", s.uid)),
        ips: s.ips.iter().map(|i| ip(IPS[*i])).collect(),
        ..Unreadable::default()
    }
}

fn build(s: &Spec) -> Pod {
    let ips: Vec<&str> = s.ips.iter().map(|i| IPS[*i]).collect();
    let mut p = pod(&format!("p{}", s.uid), &format!("uid-{}", s.uid), &ips, None);
    p.status.as_mut().unwrap().phase = Some(s.phase.into());
    p.spec.as_mut().unwrap().host_network = Some(s.host_network);
    if s.terminating {
        p = terminating(p);
    }
    if let Some((running, before_boot)) = s.container {
        let started = if before_boot { BOOT - 100 } else { BOOT + 100 };
        // Restart policy Never, so a terminated container is final.
        p.spec.as_mut().unwrap().restart_policy = Some("Never".into());
        p = with_container(p, running, started, 0);
    }
    p
}

/// What the model says an address resolves to: `Some(uid)` for exactly one owner, `None` for
/// anything else (nobody, ambiguous, held).
fn expected(pods: &HashMap<usize, Spec>, ip: usize) -> Option<String> {
    let claim = |s: &&Spec| {
        s.readable
            && s.ips.contains(&ip)
            && !s.host_network
            && !matches!(s.phase, "Succeeded" | "Failed")
            && s.container.is_none_or(|(running, before_boot)| running && !before_boot)
    };
    let claimants: Vec<&Spec> = pods.values().filter(claim).collect();
    let live: Vec<&&Spec> = claimants.iter().filter(|s| !s.terminating).collect();
    let owners: Vec<usize> = if live.is_empty() {
        claimants.iter().map(|s| s.uid).collect()
    } else {
        live.iter().map(|s| s.uid).collect()
    };
    match owners.as_slice() {
        [one] => Some(format!("uid-{one}")),
        _ => None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10_000))]

    /// Whatever the order of events, the index answers exactly one pod for an address only when
    /// the model does, and the same pod; it never answers a pod that is gone, held, contested or
    /// unreadable.
    #[test]
    fn the_index_agrees_with_the_model_after_every_event(steps in proptest::collection::vec(step(), 1..24)) {
        let mut index = Index::with_boot_time(Some(BOOT));
        let mut model: HashMap<usize, Spec> = HashMap::new();
        for step in steps {
            match step {
                Step::Apply(s) if s.readable => {
                    index.apply_pod(&build(&s));
                    model.insert(s.uid, s);
                }
                Step::Apply(s) => {
                    index.distrust_pod(&unreadable(&s));
                    model.insert(s.uid, s);
                }
                Step::Delete(uid) => {
                    let gone = model.remove(&uid).map_or_else(
                        || pod("x", &format!("uid-{uid}"), &[], None),
                        |s| build(&s),
                    );
                    index.delete_pod(&gone);
                }
                Step::Relist(specs) => {
                    model.clear();
                    for s in &specs {
                        model.insert(s.uid, s.clone());
                    }
                    // A list holds each object once: the last spec of a UID wins in both.
                    let pods: Vec<Pod> = model.values().filter(|s| s.readable).map(build).collect();
                    let unreadable: Vec<Unreadable> =
                        model.values().filter(|s| !s.readable).map(unreadable).collect();
                    index.replace_pods(&pods, &unreadable);
                }
            }
            for (i, addr) in IPS.iter().enumerate() {
                let got = match index.lookup(ip(addr)) {
                    Lookup::Found(w) => Some(w.uid.clone()),
                    _ => None,
                };
                prop_assert_eq!(got, expected(&model, i), "address {}", addr);
            }
        }
        // Nothing outlives its pod: after deleting everything, every map is empty.
        for uid in 0..5 {
            index.delete_pod(&pod("x", &format!("uid-{uid}"), &[], None));
        }
        prop_assert_eq!(index.sizes(), (0, 0, 0));
    }
}
