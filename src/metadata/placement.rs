//! Where this node is: region, zone, zone id and instance id, from the flags first and from the
//! agent's own Node second (its well-known topology labels and, on EC2, its `spec.providerID`).
//!
//! [`Placement::of_node`] reads a Node; [`resolve`] lays the flags over it and drops what does not hold
//! together (a zone outside the region is no AWS zone: botocore would cut the region out of it).
//! [`Watcher`] keeps the resolved value current from a watch of that one Node, so a relabelled node
//! answers differently without a restart; the synthetic metadata source reads it per request.
//!
//! It does not pick the STS region (the app does, once, at start: a session's region cannot change
//! under a running agent) and never writes to the Node.

use k8s_openapi::api::core::v1::Node;
use tokio::sync::{mpsc, watch as channel};
use tokio_util::sync::CancellationToken;

use crate::watch::{self, Update};

/// The region label set by cloud providers and by hand on-prem.
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
/// The zone label.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// The zone id label EKS puts on its nodes (`use1-az1`).
pub const ZONE_ID_LABEL: &str = "topology.k8s.aws/zone-id";

/// What is known of the node's place. Every field is optional: an on-prem Node may carry none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    /// `us-east-1`.
    pub region: Option<String>,
    /// `us-east-1a`.
    pub zone: Option<String>,
    /// `use1-az1`.
    pub zone_id: Option<String>,
    /// `i-0123456789abcdef0`, from an AWS providerID.
    pub instance_id: Option<String>,
}

impl Placement {
    /// What `node` says: its topology labels, then its AWS providerID for what the labels lack.
    pub fn of_node(node: &Node) -> Self {
        let label = |key: &str| {
            node.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(key))
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let provider = node
            .spec
            .as_ref()
            .and_then(|s| s.provider_id.as_deref())
            .and_then(aws_provider_id);
        let (provider_zone, instance_id) = provider.unzip();
        Self {
            region: label(REGION_LABEL),
            zone: label(ZONE_LABEL).or(provider_zone),
            zone_id: label(ZONE_ID_LABEL),
            instance_id,
        }
    }

    /// Each field from `self`, else from `fallback`.
    fn or(self, fallback: Placement) -> Self {
        Self {
            region: self.region.or(fallback.region),
            zone: self.zone.or(fallback.zone),
            zone_id: self.zone_id.or(fallback.zone_id),
            instance_id: self.instance_id.or(fallback.instance_id),
        }
    }
}

/// The zone and instance id of an AWS providerID, `aws:///us-east-1a/i-0123456789abcdef0` (the form
/// the AWS cloud provider writes; the zone part may be empty).
fn aws_provider_id(id: &str) -> Option<(String, String)> {
    let rest = id.trim().strip_prefix("aws://")?;
    let mut parts = rest.trim_start_matches('/').rsplitn(2, '/');
    let instance = parts.next()?;
    let zone = parts.next().unwrap_or_default();
    let hex = instance.strip_prefix("i-")?;
    if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (!zone.is_empty()).then(|| (zone.to_owned(), instance.to_owned()))
}

/// The placement served: `flags` over `node`, with `region` (the agent's STS region) as the last word
/// on the region. A zone that does not start with the region is dropped, with its id: SDKs derive the
/// region from the zone, and a wrong one is worse than none. Returns the reason when it drops one.
pub fn resolve(flags: &Placement, node: &Placement, region: &str) -> (Placement, Option<String>) {
    let mut node = node.clone();
    if flags.zone.is_some() {
        // The label's zone id names the label's zone, not the flag's.
        node.zone_id = None;
    }
    let mut placement = flags.clone().or(node);
    let region = placement.region.get_or_insert_with(|| region.to_owned()).clone();
    let dropped = match &placement.zone {
        Some(zone) if !zone.starts_with(&region) || zone.len() == region.len() => {
            let reason = format!("zone {zone:?} is not a zone of region {region:?}");
            placement.zone = None;
            placement.zone_id = None;
            Some(reason)
        }
        _ => None,
    };
    (placement, dropped)
}

/// How many times [`read_node`] asks before giving up (about 20 s with the watches' backoff).
const READ_ATTEMPTS: u32 = 8;

/// Why the Node could not say where it is.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server answered no (403: RBAC lacks `get` on nodes; 404: no Node of that name).
    #[error("reading Node {node}: HTTP {status} {message}")]
    Refused {
        /// `--node-name`.
        node: String,
        /// The HTTP status.
        status: u16,
        /// The Status message.
        message: String,
    },
    /// The API server could not be reached, [`READ_ATTEMPTS`] times.
    #[error("reading Node {node}")]
    Unavailable {
        /// `--node-name`.
        node: String,
        /// The last failure.
        #[source]
        source: kube::Error,
    },
}

/// Reads the placement of Node `name` once, retrying transport failures and 5xx a few times.
pub async fn read_node(client: &kube::Client, name: &str) -> Result<Placement, Error> {
    let api: kube::Api<Node> = kube::Api::all(client.clone());
    let mut failures = 0;
    loop {
        match api.get(name).await {
            Ok(node) => return Ok(Placement::of_node(&node)),
            Err(kube::Error::Api(status)) if (400..500).contains(&status.code) && status.code != 429 => {
                return Err(Error::Refused {
                    node: name.to_owned(),
                    status: status.code,
                    message: status.message,
                });
            }
            Err(source) => {
                failures += 1;
                if failures >= READ_ATTEMPTS {
                    return Err(Error::Unavailable {
                        node: name.to_owned(),
                        source,
                    });
                }
                tracing::warn!(node = %name, error = %source, "cannot read this node's labels yet; retrying");
                tokio::time::sleep(watch::retry_delay(failures, rand::random())).await;
            }
        }
    }
}

/// The live placement, as the synthetic source reads it.
pub type Live = channel::Receiver<Placement>;

/// A placement that never changes (flags only, or tests).
pub fn fixed(placement: Placement) -> Live {
    channel::channel(placement).1
}

/// Watches the agent's own Node and keeps the resolved placement current.
pub struct Watcher {
    /// The API server.
    pub client: kube::Client,
    /// `--node-name`.
    pub node_name: String,
    /// `--region` and `--availability-zone`: they win over the labels.
    pub flags: Placement,
    /// The STS region, the region served when neither a flag nor a label names one.
    pub region: String,
    /// Where the resolved placement goes.
    pub out: channel::Sender<Placement>,
    /// The list-then-watch settings.
    pub watch_config: watch::Config,
    /// The watch metrics.
    pub watch_metrics: watch::Metrics,
}

/// The Node is watched whole: there is one, and its labels are what is read.
impl watch::Object for Node {
    type Kind = Node;
    const METADATA_ONLY: bool = false;

    fn resource_version(&self) -> Option<&str> {
        self.metadata.resource_version.as_deref()
    }
}

impl Watcher {
    /// The channel to build a [`Watcher`] with, holding what is known at start.
    pub fn channel(flags: &Placement, node: &Placement, region: &str) -> (channel::Sender<Placement>, Live) {
        channel::channel(resolve(flags, node, region).0)
    }

    /// Watches until `shutdown` is cancelled. A Node that is deleted, unreadable or stale leaves the
    /// last placement in place: where a node is does not go stale the way pods do.
    pub async fn run(self, shutdown: CancellationToken) {
        let (tx, mut updates) = mpsc::channel(16);
        let nodes = watch::Watch {
            client: self.client.clone(),
            resource: "nodes",
            fields: Some(format!("metadata.name={}", self.node_name)),
            config: self.watch_config.clone(),
            metrics: self.watch_metrics.clone(),
            kind: std::marker::PhantomData::<Node>,
        };
        let apply = async {
            while let Some(update) = updates.recv().await {
                let node = match update {
                    Update::Listed { items, .. } => items.into_iter().next(),
                    Update::Applied(node) => Some(node),
                    _ => None,
                };
                if let Some(node) = node {
                    self.apply(&node);
                }
            }
        };
        tokio::join!(nodes.run(tx, shutdown), apply);
    }

    fn apply(&self, node: &Node) {
        let (placement, dropped) = resolve(&self.flags, &Placement::of_node(node), &self.region);
        let changed = self.out.send_if_modified(|current| {
            let changed = *current != placement;
            *current = placement.clone();
            changed
        });
        if changed {
            if let Some(reason) = dropped {
                tracing::warn!(node = %self.node_name, %reason, "not serving the Node's zone");
            }
            tracing::info!(
                node = %self.node_name, region = ?placement.region, zone = ?placement.zone,
                zone_id = ?placement.zone_id, "placement from the Node's labels"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(labels: &[(&str, &str)], provider_id: Option<&str>) -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "worker-7",
                "labels": labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<std::collections::BTreeMap<_, _>>(),
            },
            "spec": { "providerID": provider_id },
        }))
        .unwrap()
    }

    fn some(s: &str) -> Option<String> {
        Some(s.to_owned())
    }

    #[test]
    fn labels_name_the_place_and_an_aws_provider_id_fills_in_zone_and_instance() {
        let labelled = node(
            &[
                (REGION_LABEL, "eu-west-1"),
                (ZONE_LABEL, "eu-west-1b"),
                (ZONE_ID_LABEL, "euw1-az2"),
            ],
            Some("aws:///eu-west-1c/i-0123456789abcdef0"),
        );
        assert_eq!(
            Placement::of_node(&labelled),
            Placement {
                region: some("eu-west-1"),
                zone: some("eu-west-1b"),
                zone_id: some("euw1-az2"),
                instance_id: some("i-0123456789abcdef0"),
            }
        );
        let bare = node(&[], Some("aws:///us-east-2a/i-0fedcba987654321f"));
        assert_eq!(Placement::of_node(&bare).zone, some("us-east-2a"));
        assert_eq!(
            Placement::of_node(&bare).region,
            None,
            "the region is the label's or a flag's"
        );
        for other in [
            "vsphere://4213a1b2",
            "aws:///us-east-1a/not-an-instance",
            "aws:///i-0123",
            "kind://docker/kind/node",
        ] {
            let p = Placement::of_node(&node(&[], Some(other)));
            assert_eq!((p.zone, p.instance_id), (None, None), "{other}");
        }
    }

    #[test]
    fn flags_win_over_labels_and_a_zone_outside_the_region_is_not_served() {
        let labels = Placement {
            region: some("eu-west-1"),
            zone: some("eu-west-1b"),
            zone_id: some("euw1-az2"),
            instance_id: None,
        };
        let flags = Placement {
            zone: some("eu-west-1c"),
            ..Placement::default()
        };
        let (served, dropped) = resolve(&flags, &labels, "us-east-1");
        assert_eq!(
            (served.region, served.zone, dropped),
            (some("eu-west-1"), some("eu-west-1c"), None)
        );
        assert_eq!(served.zone_id, None, "the label's zone id is another zone's");

        let (served, _) = resolve(&Placement::default(), &Placement::default(), "us-east-1");
        assert_eq!(
            (served.region, served.zone),
            (some("us-east-1"), None),
            "the STS region at last"
        );

        for zone in ["rack-12", "eu-west-1", "us-east-1a"] {
            let odd = Placement {
                zone: some(zone),
                ..labels.clone()
            };
            let (served, dropped) = resolve(&Placement::default(), &odd, "eu-west-1");
            assert_eq!((served.zone, served.zone_id), (None, None), "{zone}");
            assert!(dropped.is_some_and(|r| r.contains(zone)), "{zone}");
        }
    }
}
