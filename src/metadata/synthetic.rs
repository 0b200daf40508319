//! The on-prem metadata source: answers synthesised from flags (region, zone) and the node name.
//!
//! Pure: no I/O, no cache, no allow-list (the tree it knows is fixed and holds nothing secret, and
//! [`super::Metadata`] checks [`super::DENIED`] before asking). Nothing here is attested by AWS, and the
//! README says so.
//!
//! Invariants: answers are stable for a node (the instance id is derived from the node name, never
//! random), and every listing names exactly the entries answered here, plus `iam/`, which the IMDS
//! handler answers.

use sha2::{Digest, Sha256};

use super::Answer;
use super::rules::{IAM_ENTRY, ROOT};

/// On-prem metadata: region and zone from flags, identity from the node name. Synthetic, and
/// documented as such: nothing here is attested by AWS.
#[derive(Debug, Clone)]
pub struct Synthetic {
    /// `--region`.
    pub region: String,
    /// `--availability-zone`; without it, no zone is listed or answered.
    pub availability_zone: Option<String>,
    /// `--node-name`, answered as the hostname and hashed into the instance id.
    pub node_name: String,
}

impl Synthetic {
    /// A stable, well-formed instance id (`i-` and 17 hex digits) derived from the node name, for tools
    /// that check the format.
    pub fn instance_id(&self) -> String {
        let digest = Sha256::digest(self.node_name.as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        format!("i-{}", &hex[..17])
    }

    /// The answer for `path` (relative to `/latest/`, no trailing slash), if this source has one.
    pub(super) fn get(&self, path: &str) -> Option<Answer> {
        let text = |s: &str| Some(Answer::Text(s.to_owned()));
        let zone = self.availability_zone.as_deref();
        match path {
            "" => text(ROOT),
            "meta-data" => text(&format!(
                "hostname\n{IAM_ENTRY}\ninstance-id\nlocal-hostname\nplacement/"
            )),
            "meta-data/hostname" | "meta-data/local-hostname" => text(&self.node_name),
            "meta-data/instance-id" => text(&self.instance_id()),
            "meta-data/placement" => text(if zone.is_some() {
                "availability-zone\nregion"
            } else {
                "region"
            }),
            "meta-data/placement/region" => text(&self.region),
            "meta-data/placement/availability-zone" => zone.and_then(text),
            "dynamic" => text("instance-identity/"),
            "dynamic/instance-identity" => text("document"),
            "dynamic/instance-identity/document" => Some(Answer::Json(self.identity_document())),
            _ => None,
        }
    }

    /// The fields SDKs read from the identity document (region above all), in EC2's key order.
    fn identity_document(&self) -> Vec<(&'static str, String)> {
        let architecture = match std::env::consts::ARCH {
            "aarch64" => "arm64",
            other => other,
        };
        let mut fields = vec![("architecture", architecture.to_owned())];
        if let Some(zone) = &self.availability_zone {
            fields.push(("availabilityZone", zone.clone()));
        }
        fields.push(("instanceId", self.instance_id()));
        fields.push(("region", self.region.clone()));
        fields.push(("version", "2017-09-30".to_owned()));
        fields
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn synthetic(zone: Option<&str>) -> Synthetic {
        Synthetic {
            region: "eu-west-1".into(),
            availability_zone: zone.map(str::to_owned),
            node_name: "worker-7".into(),
        }
    }

    #[test]
    fn synthetic_metadata_comes_from_the_flags_and_the_node_name() {
        let s = synthetic(Some("eu-west-1b"));
        let text = |p: &str| match s.get(p) {
            Some(Answer::Text(t)) => t,
            other => panic!("{p}: {other:?}"),
        };
        assert_eq!(text("meta-data/placement/region"), "eu-west-1");
        assert_eq!(text("meta-data/placement/availability-zone"), "eu-west-1b");
        assert_eq!(text("meta-data/local-hostname"), "worker-7");
        let id = text("meta-data/instance-id");
        assert!(id.len() == 19 && id.starts_with("i-"), "{id}");
        assert_eq!(id, synthetic(None).instance_id(), "stable per node");
        assert!(s.get("user-data").is_none() && s.get("meta-data/ami-id").is_none());
        assert!(synthetic(None).get("meta-data/placement/availability-zone").is_none());
        assert_eq!(
            synthetic(None).get("meta-data/placement"),
            Some(Answer::Text("region".into()))
        );
    }
}
