//! Role ARNs and the annotations that name them (`workload::RoleArn`, `roles`), and the STS session
//! name made from a pod's namespace and name (`sts::session_name`): all written by whoever can edit a
//! pod or a service account.
//!
//! Input: the annotation value (also tried as a full ARN, a base ARN, and as `namespace/name`). Checks
//! that nothing panics; that a parsed ARN re-serialises to its input and its parts are what IAM allows;
//! that an annotation resolves only to a valid role, to itself when it is a full ARN, and never falls
//! through to the default role when it is invalid; and that session names are what STS accepts.

#![no_main]

use imds_broker::roles::{BaseArn, Resolver};
use imds_broker::sts::session_name;
use imds_broker::workload::{RoleArn, Workload};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Annotation values are JSON strings in the API: always UTF-8.
    let Ok(value) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(arn) = RoleArn::parse(value) {
        check_arn(&arn, value);
    }
    if BaseArn::parse(value).is_ok() {
        let completed = value.trim_end_matches('/').to_owned() + "/app";
        let arn = RoleArn::parse(&completed).expect("a base ARN completed with a name is a role ARN");
        assert_eq!(arn.name(), "app");
    }
    resolve(value);
    let (namespace, name) = value.split_once('/').unwrap_or(("default", value));
    let session = session_name(namespace, name);
    // STS wants 2 to 64 characters; pods always have a namespace and a name.
    let shortest = if namespace.is_empty() && name.is_empty() { 1 } else { 2 };
    assert!((shortest..=64).contains(&session.len()), "{session:?}");
    assert!(
        session
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_+=,.@-".contains(&b)),
        "{session:?}"
    );
    assert_eq!(session, session_name(namespace, name), "stable");
});

fn check_arn(arn: &RoleArn, value: &str) {
    assert_eq!(arn.as_str(), value);
    assert_eq!(arn.to_string(), value);
    assert_eq!(RoleArn::parse(arn.as_str()).as_ref(), Ok(arn));
    let name = arn.name();
    assert!(value.ends_with(name) && value[..value.len() - name.len()].ends_with('/'));
    assert!((1..=64).contains(&name.len()));
    assert!(
        name.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-".contains(&b))
    );
    let account = arn.account();
    assert!(account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit()));
    assert!(value.starts_with("arn:") && value.contains(":iam::") && value.contains(":role/"));
}

fn resolve(value: &str) {
    let default = RoleArn::parse("arn:aws:iam::111111111111:role/default").expect("valid");
    let resolver = Resolver {
        base: Some(BaseArn::parse("arn:aws:iam::222222222222:role/team/").expect("valid")),
        default: Some(default.clone()),
    };
    let workload = |pod: Option<&str>, sa: Option<&str>| Workload {
        uid: "uid".into(),
        namespace: "ns".into(),
        name: "pod".into(),
        service_account: "sa".into(),
        pod_role: pod.map(str::to_owned),
        service_account_role: sa.map(str::to_owned),
        service_account_unreadable: false,
        running_since: None,
        ips: Vec::new(),
        running: true,
        terminating: false,
        host_network: false,
    };
    for (pod, sa) in [
        (Some(value), None),
        (None, Some(value)),
        (Some(value), Some(default.as_str())),
    ] {
        match resolver.resolve(&workload(pod, sa)) {
            Ok(Some(arn)) => {
                check_arn(&arn, arn.as_str());
                if value.starts_with("arn:") || pod.is_none() {
                    assert_eq!(arn.as_str(), value);
                } else {
                    assert!(arn.as_str().starts_with("arn:aws:iam::222222222222:role/team/"));
                }
            }
            Ok(None) => panic!("an annotation is present: it resolves or is refused"),
            Err(error) => {
                let _ = (error.kind(), error.to_string());
            }
        }
    }
    assert_eq!(Resolver::default().resolve(&workload(None, None)), Ok(None));
}
