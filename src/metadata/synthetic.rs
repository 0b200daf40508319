//! The on-prem metadata source: answers synthesised from the node's placement (flags over the Node's
//! labels, kept current by [`super::placement::Watcher`]) and the node name.
//!
//! Pure: no I/O, no cache, no allow-list (the tree it knows is fixed and holds nothing secret, and
//! [`super::Metadata`] checks [`super::DENIED`] before asking). Nothing here is attested by AWS: the
//! identity document says so (`"synthetic" : "true"`), and so does the README.
//!
//! Invariants: answers are stable for a node (the instance id is the AWS providerID's or derived from
//! the node name, never random), and every listing names exactly the entries answered here, plus
//! `iam/`, which the IMDS handler answers.

use sha2::{Digest, Sha256};

use super::Answer;
use super::placement::{Live, Placement};
use super::rules::{IAM_ENTRY, ROOT};

/// On-prem metadata. Synthetic, and documented as such: nothing here is attested by AWS.
#[derive(Debug, Clone)]
pub struct Synthetic {
    /// Region, zone, zone id and instance id as they stand (the region is always set).
    pub placement: Live,
    /// `--account-id`: the identity document's `accountId`; without it, the calling pod's role's.
    pub account_id: Option<String>,
    /// `--node-name`, answered as the hostname and hashed into the instance id.
    pub node_name: String,
}

impl Synthetic {
    /// The AWS providerID's instance id, else a stable, well-formed one (`i-` and 17 hex digits)
    /// derived from the node name, for tools that check the format.
    fn instance_id(&self, placement: &Placement) -> String {
        if let Some(id) = &placement.instance_id {
            return id.clone();
        }
        let digest = Sha256::digest(self.node_name.as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        format!("i-{}", &hex[..17])
    }

    /// The answer for `path` (relative to `/latest/`, no trailing slash), if this source has one.
    /// `account`: the account of the caller's role, if it has one.
    pub(super) fn get(&self, path: &str, account: Option<&str>) -> Option<Answer> {
        // Read in place: `get` never awaits, so the watch's lock is held only for this answer.
        let placement = self.placement.borrow();
        let text = |s: &str| Some(Answer::Text(s.to_owned()));
        match path {
            "" => text(ROOT),
            "meta-data" => text(&format!(
                "hostname\n{IAM_ENTRY}\ninstance-id\nlocal-hostname\nplacement/"
            )),
            "meta-data/hostname" | "meta-data/local-hostname" => text(&self.node_name),
            "meta-data/instance-id" => text(&self.instance_id(&placement)),
            "meta-data/placement" => {
                let entries = [
                    placement.zone.as_ref().map(|_| "availability-zone"),
                    placement.zone_id.as_ref().map(|_| "availability-zone-id"),
                    placement.region.as_ref().map(|_| "region"),
                ];
                text(&entries.into_iter().flatten().collect::<Vec<_>>().join("\n"))
            }
            "meta-data/placement/region" => placement.region.as_deref().and_then(text),
            "meta-data/placement/availability-zone" => placement.zone.as_deref().and_then(text),
            "meta-data/placement/availability-zone-id" => placement.zone_id.as_deref().and_then(text),
            "dynamic" => text("instance-identity/"),
            "dynamic/instance-identity" => text("document"),
            "dynamic/instance-identity/document" => Some(Answer::Json(self.identity_document(&placement, account))),
            _ => None,
        }
    }

    /// The identity document in EC2's key order. The fields SDKs and tools read are always present
    /// (empty when unknown), and `synthetic` tells a reader it is not EC2's.
    fn identity_document(&self, placement: &Placement, account: Option<&str>) -> Vec<(&'static str, String)> {
        let architecture = match std::env::consts::ARCH {
            "aarch64" => "arm64",
            other => other,
        };
        let account = self.account_id.as_deref().or(account).unwrap_or_default();
        vec![
            ("accountId", account.to_owned()),
            ("architecture", architecture.to_owned()),
            ("availabilityZone", placement.zone.clone().unwrap_or_default()),
            ("instanceId", self.instance_id(placement)),
            ("region", placement.region.clone().unwrap_or_default()),
            ("synthetic", "true".to_owned()),
            ("version", "2017-09-30".to_owned()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::placement;

    fn synthetic(zone: Option<&str>) -> Synthetic {
        Synthetic {
            placement: placement::fixed(Placement {
                region: Some("eu-west-1".into()),
                zone: zone.map(str::to_owned),
                ..Placement::default()
            }),
            account_id: None,
            node_name: "worker-7".into(),
        }
    }

    fn text(s: &Synthetic, path: &str) -> String {
        match s.get(path, None) {
            Some(Answer::Text(t)) => t,
            other => panic!("{path}: {other:?}"),
        }
    }

    fn document(s: &Synthetic, account: Option<&str>) -> Vec<(&'static str, String)> {
        match s.get("dynamic/instance-identity/document", account) {
            Some(Answer::Json(fields)) => fields,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn synthetic_metadata_comes_from_the_placement_and_the_node_name() {
        let s = synthetic(Some("eu-west-1b"));
        assert_eq!(text(&s, "meta-data/placement/region"), "eu-west-1");
        assert_eq!(text(&s, "meta-data/placement/availability-zone"), "eu-west-1b");
        assert_eq!(text(&s, "meta-data/placement"), "availability-zone\nregion");
        assert_eq!(text(&s, "meta-data/local-hostname"), "worker-7");
        let id = text(&s, "meta-data/instance-id");
        assert!(id.len() == 19 && id.starts_with("i-"), "{id}");
        assert_eq!(id, text(&synthetic(None), "meta-data/instance-id"), "stable per node");
        assert!(s.get("user-data", None).is_none() && s.get("meta-data/ami-id", None).is_none());
        assert!(s.get("meta-data/placement/availability-zone-id", None).is_none());
        assert!(
            synthetic(None)
                .get("meta-data/placement/availability-zone", None)
                .is_none()
        );
        assert_eq!(text(&synthetic(None), "meta-data/placement"), "region");
    }

    #[test]
    fn the_identity_document_always_names_account_zone_instance_and_region_and_says_it_is_synthetic() {
        let keys = |d: &[(&'static str, String)]| d.iter().map(|(k, _)| *k).collect::<Vec<_>>();
        let value = |d: &[(&str, String)], key: &str| d.iter().find(|(k, _)| *k == key).unwrap().1.clone();
        let bare = document(&synthetic(None), None);
        assert_eq!(
            keys(&bare),
            [
                "accountId",
                "architecture",
                "availabilityZone",
                "instanceId",
                "region",
                "synthetic",
                "version"
            ]
        );
        assert_eq!(
            (value(&bare, "accountId"), value(&bare, "availabilityZone")),
            (String::new(), String::new())
        );
        assert_eq!(value(&bare, "synthetic"), "true");

        let zoned = document(&synthetic(Some("eu-west-1b")), Some("111111111111"));
        assert_eq!(
            value(&zoned, "accountId"),
            "111111111111",
            "the caller's role's account"
        );
        assert_eq!(value(&zoned, "availabilityZone"), "eu-west-1b");
        let flagged = Synthetic {
            account_id: Some("222222222222".into()),
            ..synthetic(None)
        };
        assert_eq!(
            value(&document(&flagged, Some("111111111111")), "accountId"),
            "222222222222"
        );
    }

    #[test]
    fn a_changed_placement_is_answered_at_once_and_a_provider_id_names_the_instance() {
        let (tx, live) = tokio::sync::watch::channel(Placement {
            region: Some("eu-west-1".into()),
            ..Placement::default()
        });
        let s = Synthetic {
            placement: live,
            account_id: None,
            node_name: "worker-7".into(),
        };
        assert!(s.get("meta-data/placement/availability-zone", None).is_none());
        tx.send_replace(Placement {
            region: Some("eu-west-1".into()),
            zone: Some("eu-west-1c".into()),
            zone_id: Some("euw1-az3".into()),
            instance_id: Some("i-0123456789abcdef0".into()),
        });
        assert_eq!(text(&s, "meta-data/placement/availability-zone"), "eu-west-1c");
        assert_eq!(text(&s, "meta-data/placement/availability-zone-id"), "euw1-az3");
        assert_eq!(
            text(&s, "meta-data/placement"),
            "availability-zone\navailability-zone-id\nregion"
        );
        assert_eq!(text(&s, "meta-data/instance-id"), "i-0123456789abcdef0");
    }
}
