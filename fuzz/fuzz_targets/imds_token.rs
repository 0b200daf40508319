//! IMDSv2 tokens (`server::imds_token`): the TTL header and the token header are what a pod controls.
//!
//! Input: `TTL-header-value LF token`. Checks that neither parser panics; that a presented token that
//! verifies is in its one canonical encoding, unexpired, and refused for another IP, under another key
//! and at its expiry (whatever the token version); and, for every TTL the header parser accepts, that
//! an issued token verifies for its caller until it expires and never for another IP or another key.

#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use imds_broker::server::imds_token::{Invalid, Issuer, MAX_TTL_SECONDS, parse_ttl};
use libfuzzer_sys::fuzz_target;

/// The clock of every check: a fixed, realistic Unix time (the agent reads the system clock; it is not
/// input a pod controls).
const NOW: u64 = 1_750_000_000;
const KEY: [u8; 32] = [7; 32];
const CALLER: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));

fuzz_target!(|data: &[u8]| {
    let (ttl_header, token) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let issuer = Issuer::new(KEY);

    let ttl = parse_ttl(ttl_header);
    if let Some(ttl) = ttl {
        assert!((1..=MAX_TTL_SECONDS).contains(&ttl));
        let text = std::str::from_utf8(ttl_header).expect("an accepted TTL is ASCII digits");
        assert_eq!(text.trim_start_matches('0'), ttl.to_string());
    }

    // The agent hands `verify` only header values that are visible ASCII (`to_str`); any UTF-8 string
    // is a superset of those.
    if let Ok(token) = std::str::from_utf8(token) {
        presented(&issuer, token);
    }

    // Callers and keys derived from the input, so the fuzzer explores address families too.
    let seed: Vec<u8> = token.iter().copied().chain([0; 32]).take(32).collect();
    let other_ip = if seed[0] & 1 == 0 {
        IpAddr::V4(Ipv4Addr::new(seed[1], seed[2], seed[3], seed[4]))
    } else {
        IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&seed[1..17]).expect("16 bytes")))
    };
    let other_key: [u8; 32] = seed.try_into().expect("32 bytes");
    if let Some(ttl) = ttl {
        issued(&issuer, ttl, other_ip, other_key);
    }
});

/// A token as a pod presents it.
fn presented(issuer: &Issuer, token: &str) {
    match issuer.verify(token, CALLER, NOW) {
        Ok(()) => {
            // Only a token minted under this key for this caller gets here (forging one takes the key).
            let bytes = STANDARD.decode(token).expect("a verified token is base64");
            assert_eq!(STANDARD.encode(&bytes), token, "one encoding only");
            let expiry = u64::from_be_bytes(bytes[1..9].try_into().expect("8 bytes"));
            assert!(expiry > NOW);
            assert_eq!(issuer.verify(token, CALLER, expiry), Err(Invalid::Expired));
            assert_eq!(
                Issuer::new([8; 32]).verify(token, CALLER, NOW),
                Err(Invalid::WrongCaller)
            );
            assert_eq!(
                issuer.verify(token, "10.0.0.2".parse().expect("ip"), NOW),
                Err(Invalid::WrongCaller)
            );
        }
        Err(Invalid::Malformed) => {}
        Err(Invalid::WrongCaller | Invalid::Expired) => assert_eq!(token.len(), 56),
    }
}

/// A token the agent issued to `CALLER` for `ttl` seconds.
fn issued(issuer: &Issuer, ttl: u64, other_ip: IpAddr, other_key: [u8; 32]) {
    let token = issuer.issue(CALLER, ttl, NOW);
    assert_eq!(token.len(), 56);
    assert!(token.bytes().all(|b| b.is_ascii_graphic()));
    assert_eq!(issuer.verify(&token, CALLER, NOW), Ok(()));
    assert_eq!(issuer.verify(&token, CALLER, NOW + ttl - 1), Ok(()));
    assert_eq!(issuer.verify(&token, CALLER, NOW + ttl), Err(Invalid::Expired));
    // An IPv4 caller and its IPv4-mapped IPv6 form are one address (a dual-stack socket reports either).
    let same = other_ip.to_canonical() == CALLER;
    assert_eq!(issuer.verify(&token, other_ip, NOW).is_ok(), same, "{other_ip}");
    let same_key = other_key == KEY;
    assert_eq!(Issuer::new(other_key).verify(&token, CALLER, NOW).is_ok(), same_key);
}
