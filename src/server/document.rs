//! The documents IMDS serves, rendered byte for byte in EC2's layout: two-space indented JSON with
//! `" : "` and keys in EC2's order, times as `YYYY-MM-DDTHH:MM:SSZ`. Pure functions; choosing a status
//! for them is [`super::response`]'s job.

use time::OffsetDateTime;
use time::macros::format_description;

use crate::workload::{Credentials, RoleArn};

/// `YYYY-MM-DDTHH:MM:SSZ` in UTC, the only time format IMDS uses.
pub fn imds_time(t: OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .format(format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z"))
        .expect("every UTC date-time formats")
}

/// EC2's JSON layout: two-space indent, `" : "`, keys in the given order, string values.
pub fn json(fields: &[(&str, &str)]) -> String {
    let mut out = String::from("{\n");
    for (i, (key, value)) in fields.iter().enumerate() {
        let value = serde_json::to_string(value).expect("strings always serialise");
        out.push_str(&format!("  \"{key}\" : {value}"));
        out.push_str(if i + 1 < fields.len() { ",\n" } else { "\n" });
    }
    out.push('}');
    out
}

/// The role document for `credentials`.
pub fn credentials(credentials: &Credentials) -> String {
    json(&[
        ("Code", "Success"),
        ("LastUpdated", &imds_time(credentials.last_updated)),
        ("Type", "AWS-HMAC"),
        ("AccessKeyId", &credentials.access_key_id),
        ("SecretAccessKey", credentials.secret_access_key.expose()),
        ("Token", credentials.session_token.expose()),
        ("Expiration", &imds_time(credentials.expiration)),
    ])
}

/// `iam/info` for a pod's role: a synthetic instance profile named after the role.
pub fn info(role: &RoleArn, last_updated: OffsetDateTime) -> String {
    use sha2::{Digest, Sha256};
    let partition = role.as_str().split(':').nth(1).unwrap_or("aws");
    let path_and_name = role
        .as_str()
        .split_once(":role/")
        .map(|(_, r)| r)
        .unwrap_or(role.name());
    let profile_arn = format!(
        "arn:{partition}:iam::{}:instance-profile/{path_and_name}",
        role.account()
    );
    // Instance profile ids are "AIPA" + 17 upper-case alphanumerics; derive one stably from the role.
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let digest = Sha256::digest(role.as_str().as_bytes());
    let id: String = std::iter::once("AIPA".to_owned())
        .chain(
            digest
                .iter()
                .take(17)
                .map(|b| (ALPHABET[(*b & 31) as usize] as char).to_string()),
        )
        .collect();
    json(&[
        ("Code", "Success"),
        ("LastUpdated", &imds_time(last_updated)),
        ("InstanceProfileArn", &profile_arn),
        ("InstanceProfileId", &id),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::Secret;
    use time::macros::datetime;

    #[test]
    fn the_role_document_matches_ec2_byte_for_byte() {
        let creds = Credentials {
            access_key_id: "ASIAIOSFODNN7EXAMPLE".into(),
            secret_access_key: Secret::new("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
            session_token: Secret::new("token"),
            expiration: datetime!(2017-05-17 15:09:54 UTC),
            last_updated: datetime!(2012-04-26 16:39:16 UTC),
        };
        assert_eq!(
            credentials(&creds),
            "{\n  \"Code\" : \"Success\",\n  \"LastUpdated\" : \"2012-04-26T16:39:16Z\",\n  \"Type\" : \"AWS-HMAC\",\n  \
             \"AccessKeyId\" : \"ASIAIOSFODNN7EXAMPLE\",\n  \"SecretAccessKey\" : \"wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\",\n  \
             \"Token\" : \"token\",\n  \"Expiration\" : \"2017-05-17T15:09:54Z\"\n}"
        );
    }

    #[test]
    fn times_are_utc_whole_seconds() {
        let t = datetime!(2026-11-23 23:59:59.987 +02:00);
        assert_eq!(imds_time(t), "2026-11-23T21:59:59Z");
    }

    #[test]
    fn info_names_an_instance_profile_after_the_role() {
        let role = RoleArn::parse("arn:aws:iam::123456789012:role/team/app").unwrap();
        let doc: serde_json::Value = serde_json::from_str(&info(&role, datetime!(2020-04-02 18:50:40 UTC))).unwrap();
        assert_eq!(doc["Code"], "Success");
        assert_eq!(
            doc["InstanceProfileArn"],
            "arn:aws:iam::123456789012:instance-profile/team/app"
        );
        let id = doc["InstanceProfileId"].as_str().unwrap();
        assert!(id.starts_with("AIPA") && id.len() == 21, "{id}");
    }
}
