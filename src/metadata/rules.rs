//! What of the metadata tree may be served: the `--allow-path` allow-list, the [`DENIED`] prefixes that
//! are never proxied, and which entries a listing may show.
//!
//! Pure: no I/O and no source of answers. The sources ([`super::synthetic`], [`super::upstream`]) ask
//! these rules; they do not decide what is served on their own.
//!
//! Invariants: deny by default, and [`DENIED`] is checked after the allow-list, so no pattern, however
//! permissive, can let a denied path through or list it. Patterns match the whole path after `/latest/`.

use regex::Regex;

/// What the default allow-list lets through, each for a named reader (see the README, "Metadata besides credentials").
pub const DEFAULT_ALLOW: &[&str] = &[
    // Region and zone: the Rust SDK reads placement/region; botocore and the C++ SDK derive the region
    // from availability-zone; zone ids are what cross-account tooling compares.
    "meta-data/placement/(region|availability-zone|availability-zone-id)",
    // Go v1/v2 and Java v1 read the region from the identity document (unsigned: it proves nothing).
    "dynamic/instance-identity/document",
    // Resource detectors (OpenTelemetry, X-Ray, CloudWatch agent) and Java's EC2MetadataUtils.
    "meta-data/(instance-id|instance-type|local-hostname|hostname)",
];

/// Never proxied, whatever `--allow-path` says: path prefixes (whole segments) relative to `/latest/`.
/// The node's role and its identity credentials would hand the node's AWS identity to a pod; user-data
/// often holds bootstrap secrets; the signed identity documents let a pod prove it is the node (e.g. to
/// Vault's EC2 auth); spot notices belong to the node's lifecycle handler.
pub const DENIED: &[&str] = &[
    "meta-data/iam",
    "meta-data/identity-credentials",
    "meta-data/spot",
    "user-data",
    "dynamic/instance-identity/signature",
    "dynamic/instance-identity/pkcs7",
    "dynamic/instance-identity/rsa2048",
];

/// Every `/latest/` listing starts here; user-data is never served.
pub(super) const ROOT: &str = "dynamic\nmeta-data";

/// The credential tree the IMDS handler serves, added to every `meta-data/` listing.
pub(super) const IAM_ENTRY: &str = "iam/";

/// The allow-list, compiled.
#[derive(Debug, Clone)]
pub struct Rules {
    /// Each pattern as given and anchored (`^(?:…)$`).
    patterns: Vec<(String, Regex)>,
}

impl Rules {
    /// Compiles `patterns` (regular expressions over the path after `/latest/`, matched whole).
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<Self, regex::Error> {
        let patterns = patterns
            .iter()
            .map(|p| {
                let p = p.as_ref();
                Regex::new(&format!("^(?:{p})$")).map(|r| (p.to_owned(), r))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { patterns })
    }

    /// The default allow-list.
    pub fn default_allow() -> Self {
        Self::new(DEFAULT_ALLOW).expect("the default patterns compile")
    }

    /// Whether the leaf `path` may be fetched.
    pub fn allows(&self, path: &str) -> bool {
        !denied(path) && self.patterns.iter().any(|(_, r)| r.is_match(path))
    }

    /// Whether `path` is a directory this agent lists: the roots, the parents of denied entries (so
    /// that a permissive pattern cannot list them), and every directory a pattern spells out literally.
    pub fn is_directory(&self, path: &str) -> bool {
        ["", "meta-data", "dynamic", "dynamic/instance-identity"].contains(&path)
            || self.patterns.iter().any(|(p, _)| p.starts_with(&format!("{path}/")))
    }

    /// Whether the directory `path` has anything served under it.
    pub(super) fn shows_directory(&self, path: &str) -> bool {
        !denied(path)
            && self
                .patterns
                .iter()
                .any(|(p, r)| p.starts_with(&format!("{path}/")) || r.is_match(&format!("{path}/")))
    }

    /// Keeps only the entries of the listing of `directory` (an upstream IMDS listing body: one entry a
    /// line, directories ending in `/`) that are served.
    pub fn filter(&self, directory: &str, listing: &str) -> Vec<String> {
        listing
            .lines()
            .filter(|entry| !entry.is_empty() && !entry.contains(['\\', '%']) && !entry.starts_with('.'))
            .filter(|entry| {
                let full = format!("{directory}/{}", entry.trim_end_matches('/'));
                if entry.ends_with('/') {
                    self.shows_directory(&full)
                } else {
                    self.allows(&full)
                }
            })
            .map(str::to_owned)
            .collect()
    }
}

/// Whether `path` is, or is under, a [`DENIED`] prefix.
pub fn denied(path: &str) -> bool {
    DENIED
        .iter()
        .any(|d| path == *d || path.strip_prefix(d).is_some_and(|rest| rest.starts_with('/')))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_allow_list_serves_what_sdks_read_and_nothing_else() {
        let rules = Rules::default_allow();
        for path in [
            "meta-data/placement/region",
            "meta-data/placement/availability-zone",
            "meta-data/placement/availability-zone-id",
            "dynamic/instance-identity/document",
            "meta-data/instance-id",
            "meta-data/instance-type",
            "meta-data/local-hostname",
        ] {
            assert!(rules.allows(path), "{path}");
        }
        for path in [
            "user-data",
            "meta-data/iam/security-credentials/node-role",
            "meta-data/local-ipv4",
            "meta-data/placement/region/x",
            "xmeta-data/instance-id",
            "dynamic/instance-identity/pkcs7",
        ] {
            assert!(!rules.allows(path), "{path}");
        }
    }

    #[test]
    fn the_hard_deny_list_wins_over_a_permissive_pattern() {
        let rules = Rules::new(&[".*"]).unwrap();
        for path in [
            "meta-data/iam/security-credentials/node-role",
            "meta-data/iam/info",
            "meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
            "user-data",
            "meta-data/spot/instance-action",
            "dynamic/instance-identity/signature",
        ] {
            assert!(!rules.allows(path), "{path}");
        }
        assert!(rules.allows("meta-data/ami-id"));
        assert!(!denied("meta-data/iamx") && !denied("user-database"));
    }

    #[test]
    fn listings_keep_only_served_entries() {
        let rules = Rules::default_allow();
        let upstream = "ami-id\nhostname\niam/\nidentity-credentials/\ninstance-id\nlocal-ipv4\nplacement/\nspot/";
        assert_eq!(
            rules.filter("meta-data", upstream),
            ["hostname", "instance-id", "placement/"]
        );
        let permissive = Rules::new(&[".*"]).unwrap();
        assert_eq!(
            permissive.filter("meta-data", upstream),
            ["ami-id", "hostname", "instance-id", "local-ipv4", "placement/"]
        );
        assert_eq!(
            permissive.filter("dynamic/instance-identity", "document\npkcs7\nrsa2048\nsignature"),
            ["document"]
        );
        assert!(rules.is_directory("meta-data/placement") && !rules.is_directory("meta-data/placement/region"));
    }
}
