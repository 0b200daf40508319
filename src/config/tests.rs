//! Flag parsing and validation, as the binary parses them.

use super::*;

fn args(extra: &[&str]) -> Result<Args, clap::Error> {
    let mut all = vec!["imds-broker", "--node-name", "n1", "--region", "eu-west-1"];
    all.extend_from_slice(extra);
    Cli::try_parse_from(all).map(|cli| cli.run)
}

#[test]
fn the_uninstall_command_needs_no_agent_flags() {
    let cli = Cli::try_parse_from(["imds-broker", "iptables", "uninstall"]).unwrap();
    assert!(matches!(
        cli.command,
        Some(Command::Iptables {
            action: IptablesAction::Uninstall
        })
    ));
}

#[test]
fn the_agent_needs_a_node_name() {
    let cli = Cli::try_parse_from(["imds-broker", "--region", "eu-west-1"]).unwrap();
    assert!(matches!(cli.run.config(), Err(Error::NodeName)));
}

#[test]
fn defaults_make_a_valid_config() {
    let config = args(&[]).unwrap().config().unwrap();
    assert_eq!(config.listen, "0.0.0.0:8181".parse().unwrap());
    assert_eq!(config.metrics_listen, "0.0.0.0:9181".parse().unwrap());
    assert_eq!(config.imds.imdsv2, Imdsv2::Optional);
    assert_eq!(config.imds.pod_wait, Duration::from_millis(500));
    assert_eq!(config.sa_token.audience, "sts.amazonaws.com");
    assert_eq!(config.sts.session_duration, Duration::from_secs(3600));
    assert_eq!(config.credentials.min_remaining, Duration::from_secs(900));
    assert!(config.roles.default.is_none() && config.roles.base.is_none());
}

#[test]
fn without_a_region_flag_the_region_is_left_to_the_nodes_label() {
    let cli = Cli::try_parse_from(["imds-broker", "--node-name", "n1", "--region", ""]).unwrap();
    let config = cli.run.config().unwrap();
    assert_eq!(config.region, None);
    assert_eq!(config.metadata.flags, metadata::Placement::default());
    let config = args(&["--availability-zone", "eu-west-1b"]).unwrap().config().unwrap();
    assert_eq!(config.region.as_deref(), Some("eu-west-1"));
    assert_eq!(config.metadata.flags.zone.as_deref(), Some("eu-west-1b"));
}

#[test]
fn an_account_id_is_twelve_digits() {
    let config = args(&["--account-id", "123456789012"]).unwrap().config().unwrap();
    assert_eq!(config.metadata.account_id.as_deref(), Some("123456789012"));
    for bad in ["12345678901", "1234567890123", "12345678901x"] {
        assert!(
            matches!(args(&["--account-id", bad]).unwrap().config(), Err(Error::AccountId(ref v)) if v == bad),
            "{bad}"
        );
    }
}

#[test]
fn invalid_role_flags_are_refused() {
    assert!(matches!(
        args(&["--default-role", "admin"]).unwrap().config(),
        Err(Error::DefaultRole { .. })
    ));
    assert!(matches!(
        args(&["--base-role-arn", "arn:aws:iam::1:role/"]).unwrap().config(),
        Err(Error::BaseArn { .. })
    ));
}

#[test]
fn out_of_range_numbers_are_refused_by_the_parser() {
    assert!(args(&["--session-duration", "900"]).is_err());
    assert!(args(&["--token-expiration", "60"]).is_err());
    assert!(args(&["--imdsv2", "sometimes"]).is_err());
}

#[test]
fn a_session_must_outlive_the_minimum_remaining() {
    let err = args(&["--session-duration", "1200", "--credential-min-remaining", "20m"])
        .unwrap()
        .config();
    assert!(matches!(err, Err(Error::SessionTooShort { .. })));
}

#[test]
fn iptables_is_off_by_default_and_needs_interfaces_and_a_node_ip_when_on() {
    assert!(args(&[]).unwrap().config().unwrap().netfilter.is_none());
    assert!(matches!(
        args(&["--iptables", "--node-ip", "10.0.0.7"]).unwrap().config(),
        Err(Error::NoHostInterface)
    ));
    assert!(matches!(
        args(&["--iptables", "--host-interface", "cali+"]).unwrap().config(),
        Err(Error::NoNodeIp)
    ));
    let config = args(&[
        "--iptables",
        "--host-interface",
        "cali+,!eth0",
        "--node-ip",
        "10.0.0.7,fd00::7",
        "--listen",
        "0.0.0.0:8282",
    ])
    .unwrap()
    .config()
    .unwrap()
    .netfilter
    .unwrap();
    assert_eq!(config.interfaces.len(), 2);
    assert!(config.interfaces[1].negated);
    assert_eq!(config.node_ips.len(), 2);
    assert_eq!(config.port, 8282);
    assert_eq!(config.reconcile_interval, Duration::from_secs(30));
}

#[test]
fn iptables_refuses_loopback_duplicate_family_and_bad_patterns() {
    let with = |interface: &str, ip: &str| {
        args(&["--iptables", "--host-interface", interface, "--node-ip", ip])
            .unwrap()
            .config()
    };
    assert!(matches!(with("cali+", "127.0.0.1"), Err(Error::NodeIp { .. })));
    assert!(matches!(with("cali+", "10.0.0.1,10.0.0.2"), Err(Error::NodeIp { .. })));
    assert!(matches!(
        with("eth0 -j ACCEPT", "10.0.0.1"),
        Err(Error::HostInterface { .. })
    ));
}

#[test]
fn metadata_defaults_are_synthetic_with_the_default_allow_list_and_a_hop_limit_of_one() {
    let config = args(&[]).unwrap().config().unwrap();
    assert_eq!(config.metadata.mode, metadata::Mode::None);
    assert!(config.metadata.allow.allows("meta-data/placement/region"));
    assert!(config.metadata.flags.zone.is_none());
    assert_eq!(config.imds.token_hop_limit, 1);
    assert!(config.token_key_file.is_none());
}

#[test]
fn metadata_flags_are_validated() {
    assert!(args(&["--upstream-imds", "https://169.254.169.254"]).is_err());
    assert!(args(&["--token-hop-limit", "0"]).is_err());
    assert!(args(&["--token-hop-limit", "65"]).is_err());
    assert!(matches!(
        args(&["--allow-path", "meta-data/(unclosed"]).unwrap().config(),
        Err(Error::AllowPath { .. })
    ));
    assert!(matches!(
        args(&["--availability-zone", "us-east-1a"]).unwrap().config(),
        Err(Error::AvailabilityZone { .. })
    ));
    let config = args(&[
        "--upstream-imds",
        "http://127.0.0.1:9",
        "--allow-path",
        "meta-data/ami-id",
        "--allow-path",
        "meta-data/mac",
        "--availability-zone",
        "eu-west-1c",
    ])
    .unwrap()
    .config()
    .unwrap();
    assert_eq!(
        config.metadata.mode,
        metadata::Mode::Upstream("127.0.0.1:9".parse().unwrap())
    );
    assert!(config.metadata.allow.allows("meta-data/mac"));
    assert!(
        !config.metadata.allow.allows("meta-data/placement/region"),
        "replaces the defaults"
    );
}

#[test]
fn durations_parse_with_units() {
    assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
    assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
    assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
    assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
    assert!(parse_duration("1.5s").is_err());
    assert!(parse_duration("ms").is_err());
    assert!(parse_duration("5d").is_err());
}

#[test]
fn the_identity_source_defaults_to_kubernetes_and_spire_takes_the_admin_socket_and_audience() {
    let config = args(&[]).unwrap().config().unwrap();
    assert!(config.spire.is_none(), "TokenRequest is the default");

    let config = args(&["--identity-source", "spire", "--token-audience", "aud-1"])
        .unwrap()
        .config()
        .unwrap();
    let spire = config.spire.unwrap();
    assert_eq!(spire.socket, std::path::Path::new("/run/spire/admin/admin.sock"));
    assert_eq!(spire.audience, "aud-1");

    let config = args(&["--identity-source", "spire", "--spire-admin-socket", "/tmp/a.sock"])
        .unwrap()
        .config()
        .unwrap();
    assert_eq!(config.spire.unwrap().socket, std::path::Path::new("/tmp/a.sock"));
    assert!(
        args(&["--identity-source", "vault"]).is_err(),
        "an unknown source was accepted"
    );
}
