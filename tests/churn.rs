//! Churn: a thousand pods come and go on a handful of reused addresses while the API server delays
//! and reorders events, compacts its history and cuts watches, and a prober asks from every address
//! all the while. No credential of a pod is ever served after that pod's containers terminated (plus
//! the injected event delay), nor to an address that is not the pod's; afterwards every per-pod
//! structure is empty. Paused time: the whole run is a few minutes of virtual time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::StatusCode;
use time::OffsetDateTime;
use tokio::time::Instant;

use crate::support::Cluster;
use crate::support::agent::Agent;
use crate::support::fixtures::pod;
use crate::support::kube::{ContainerFixture, Kind};

const CREDS: &str = "/latest/meta-data/iam/security-credentials/";
const LANES: usize = 5;
const CYCLES_PER_LANE: usize = 200;
/// Pod events reach the agent this late, plus up to the jitter (order kept within a watch).
const EVENT_DELAY: Duration = Duration::from_millis(300);
const EVENT_JITTER: Duration = Duration::from_millis(200);

/// What the prober saw: an access key served to an address at an instant.
struct Served {
    ip: String,
    key: String,
    at: Instant,
}

fn ip(lane: usize) -> String {
    format!("127.0.12.{}", lane + 1)
}

/// One address's life: pods created, run, terminated, deleted, one after another. The next pod is
/// created as soon as the previous one's containers terminated (the CNI frees the address before the
/// API server deletes the pod).
async fn lane(cluster: &Cluster, lane: usize, terminated: &Mutex<HashMap<String, Instant>>) {
    let address = ip(lane);
    for cycle in 0..CYCLES_PER_LANE {
        let name = format!("c{lane}-{cycle}");
        let fixture = pod(&name, &address)
            .role(&format!("r{}", cycle % 7))
            .container(ContainerFixture::Running(OffsetDateTime::now_utc()));
        cluster.add_pod(&fixture);
        // Live for 0.6-1.4 s, varying by lane and cycle.
        tokio::time::sleep(Duration::from_millis(600 + ((lane * 37 + cycle * 101) % 800) as u64)).await;
        let done = ContainerFixture::Terminated(OffsetDateTime::now_utc(), 0);
        cluster.add_pod(&fixture.clone().deleting().container(done));
        terminated
            .lock()
            .unwrap()
            .insert(fixture.uid_str().to_owned(), Instant::now());
        let name_to_delete = name.clone();
        let delete_after = Duration::from_millis(100 + (cycle % 5) as u64 * 100);
        let kube = &cluster.kube;
        // The delete lands later, while the next pod already uses the address.
        let deletion = async move {
            tokio::time::sleep(delete_after).await;
            kube.delete_pod("apps", &name_to_delete);
        };
        if cycle + 1 == CYCLES_PER_LANE {
            deletion.await;
        } else {
            tokio::join!(
                deletion,
                tokio::time::sleep(Duration::from_millis(((cycle * 13) % 50) as u64))
            );
        }
    }
}

/// Asks from `lane`'s address every 100 ms until `stop`: the listing, then the named role's document.
async fn prober(agent: &Agent, lane: usize, stop: &tokio::sync::watch::Sender<bool>, served: &Mutex<Vec<Served>>) {
    let address = ip(lane);
    let caller = agent.from(&address);
    let mut stop = stop.subscribe();
    while !*stop.borrow_and_update() {
        let listing = caller.get(CREDS, &[]).await;
        if listing.status == StatusCode::OK {
            let reply = caller.get(&format!("{CREDS}{}", listing.text()), &[]).await;
            if reply.status == StatusCode::OK {
                let doc = reply.json();
                if let Some(key) = doc["AccessKeyId"].as_str() {
                    served.lock().unwrap().push(Served {
                        ip: address.clone(),
                        key: key.to_owned(),
                        at: Instant::now(),
                    });
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = stop.changed() => {}
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_thousand_pods_churning_on_five_addresses_never_get_anothers_or_a_dead_pods_credentials() {
    let cluster = Cluster::start().await;
    cluster.sts.trust_all(true);
    cluster.kube.set_event_delay(Kind::Pod, EVENT_DELAY);
    cluster.kube.set_event_jitter(Kind::Pod, EVENT_JITTER);
    cluster
        .kube
        .set_event_delay(Kind::ServiceAccount, Duration::from_millis(50));
    cluster.add_service_account(&crate::support::fixtures::service_account("apps", "default", None));
    let agent = cluster
        .agent(&["--refresh-check-interval", "1s", "--exchange-rate", "1000"])
        .await;
    let terminated = Mutex::new(HashMap::new());
    let served = Mutex::new(Vec::new());
    let (stop, _) = tokio::sync::watch::channel(false);
    let stop = Arc::new(stop);

    let lanes = futures::future::join_all((0..LANES).map(|l| lane(&cluster, l, &terminated)));
    let probers = futures::future::join_all((0..LANES).map(|l| prober(&agent, l, &stop, &served)));
    // Watches are cut every 40 s, and once, mid-way, the history is compacted first (410 → relist).
    let disruption = async {
        for round in 1.. {
            tokio::time::sleep(Duration::from_secs(40)).await;
            if round == 3 {
                cluster.kube.compact();
            }
            cluster.kube.break_watches();
        }
    };
    let run = async {
        lanes.await;
        stop.send_replace(true);
    };
    tokio::select! {
        _ = async { tokio::join!(run, probers) } => {}
        () = disruption => unreachable!("the disruption loop never ends"),
    }

    // Judge every delivery.
    let terminated = terminated.into_inner().unwrap();
    let served = served.into_inner().unwrap();
    let mut wrong = Vec::new();
    for s in &served {
        let issued = cluster.sts.whois(&s.key).expect("every served key was issued by STS");
        let uid = issued.pod_uid.clone().expect("pod-bound");
        let owner_ip = cluster_ip_of(&issued.pod_name.clone().unwrap_or_default());
        let late = terminated
            .get(&uid)
            .is_some_and(|t| s.at > *t + EVENT_DELAY + EVENT_JITTER + Duration::from_millis(1));
        if late || owner_ip != s.ip {
            wrong.push(format!(
                "{} got {} of {:?} (late: {late})",
                s.ip, s.key, issued.pod_name
            ));
        }
    }
    assert_eq!(terminated.len(), LANES * CYCLES_PER_LANE);
    assert!(served.len() > 2000, "the prober was served only {} times", served.len());
    assert!(
        wrong.is_empty(),
        "{} wrong deliveries, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    assert!(
        agent
            .metric("imds_broker_watch_relists_total", "resource=\"pods\",cause=\"gone\"")
            .await
            >= 1.0
    );

    // Nothing is left behind: every per-pod structure drains.
    let started = Instant::now();
    loop {
        let metrics = agent.metrics().await;
        let sizes: Vec<f64> = [
            "imds_broker_pods_indexed",
            "imds_broker_pods_held",
            "imds_broker_pods_addresses",
            "imds_broker_credentials_pods",
            "imds_broker_credentials_exchanges_in_flight",
        ]
        .iter()
        .map(|name| crate::support::agent::parse_metric(&metrics, name, ""))
        .collect();
        if sizes.iter().all(|s| *s == 0.0) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "per-pod structures left: {sizes:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    agent.stop().await;
}

/// The address lane `c<lane>-<cycle>` pods use.
fn cluster_ip_of(pod_name: &str) -> String {
    let lane: usize = pod_name
        .strip_prefix('c')
        .and_then(|rest| rest.split('-').next())
        .and_then(|l| l.parse().ok())
        .expect("a churn pod name");
    ip(lane)
}
