//! IMDSv2 tokens (what `PUT /latest/api/token` hands a pod): stateless, HMAC-signed, bound to the
//! caller's IP, expiring. Not to be confused with service-account tokens ([`crate::sa_token`]) or the
//! STS session token inside credentials.
//!
//! A token is base64 of `version (1) ‖ expiry (8, unix seconds, big-endian) ‖ nonce (8, random) ‖
//! HMAC-SHA256(key, version ‖ expiry ‖ nonce ‖ caller IP as 16 bytes), first 24 bytes`: 41 bytes, 56
//! characters, like EC2's. The nonce makes every `PUT` return a fresh token, as EC2 does (two PUTs in one
//! second with one TTL must not return the same token). Version 1 tokens (no nonce, the whole 32-byte
//! tag), issued before, still verify until they expire. Nothing is stored per token, so a token flood
//! costs no memory. The caller passes the time.

use std::net::IpAddr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// What is issued: with a nonce, the tag truncated to 24 bytes (192 bits).
const VERSION: u8 = 2;
/// What was issued before: no nonce, the whole tag.
const VERSION_1: u8 = 1;
const LEN: usize = 41;
const TAG: usize = 24;

/// The longest TTL EC2 grants: six hours.
pub const MAX_TTL_SECONDS: u64 = 21_600;

/// Why a token was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// Not a token this agent could have issued (length, encoding, version).
    #[error("token is not one of ours")]
    Malformed,
    /// Issued to another IP, or under another key.
    #[error("token signature does not match this caller")]
    WrongCaller,
    /// Past its TTL.
    #[error("token expired")]
    Expired,
}

/// Issues and checks IMDSv2 tokens with one secret key.
#[derive(Clone)]
pub struct Issuer {
    key: [u8; 32],
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Issuer(<key redacted>)")
    }
}

impl Issuer {
    /// Issuer signed with `key`.
    pub fn new(key: [u8; 32]) -> Self {
        Self { key }
    }

    /// Issuer with a fresh random key (tokens do not survive a restart).
    pub fn random() -> Self {
        Self::new(rand::random())
    }

    /// The shortest secret [`Issuer::from_secret`] accepts.
    pub const MIN_SECRET: usize = 32;

    /// Issuer keyed by a secret that outlives the process (`--token-key-file`), so tokens survive a
    /// restart. The key is derived, never the secret itself, so the same secret could key something
    /// else without the two being related.
    pub fn from_secret(secret: &[u8]) -> Option<Self> {
        use sha2::Digest;
        if secret.len() < Self::MIN_SECRET {
            return None;
        }
        let mut hash = Sha256::new();
        // A fixed derivation label: changing it would invalidate every token issued with a key file.
        hash.update(b"imds-broker IMDSv2 session key v1\0");
        hash.update(secret);
        Some(Self::new(hash.finalize().into()))
    }

    fn mac(&self, head: &[u8], ip: IpAddr) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        mac.update(head);
        let ip16 = match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        mac.update(&ip16);
        mac
    }

    /// A fresh token for `ip`, valid for `ttl_seconds` from `now` (unix seconds).
    pub fn issue(&self, ip: IpAddr, ttl_seconds: u64, now: u64) -> String {
        let mut bytes = Vec::with_capacity(LEN);
        bytes.push(VERSION);
        bytes.extend_from_slice(&(now + ttl_seconds).to_be_bytes());
        bytes.extend_from_slice(&rand::random::<[u8; 8]>());
        let tag = self.mac(&bytes, ip).finalize().into_bytes();
        bytes.extend_from_slice(&tag[..TAG]);
        STANDARD.encode(bytes)
    }

    /// Checks `token` for a request from `ip` at `now` (unix seconds).
    pub fn verify(&self, token: &str, ip: IpAddr, now: u64) -> Result<(), Invalid> {
        if token.len() != 56 {
            return Err(Invalid::Malformed);
        }
        let bytes = STANDARD.decode(token).map_err(|_| Invalid::Malformed)?;
        if bytes.len() != LEN {
            return Err(Invalid::Malformed);
        }
        let (head, tag) = match bytes[0] {
            VERSION => bytes.split_at(LEN - TAG),
            VERSION_1 => bytes.split_at(9),
            _ => return Err(Invalid::Malformed),
        };
        self.mac(head, ip)
            .verify_truncated_left(tag)
            .map_err(|_| Invalid::WrongCaller)?;
        let expiry = u64::from_be_bytes(head[1..9].try_into().expect("8 bytes"));
        if now >= expiry {
            return Err(Invalid::Expired);
        }
        Ok(())
    }
}

/// Parses the TTL header of a token request: an integer from 1 to 21600.
pub fn parse_ttl(value: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(value).ok()?;
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse::<u64>().ok().filter(|t| (1..=MAX_TTL_SECONDS).contains(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_token_works_for_its_caller_until_it_expires() {
        let s = Issuer::new([7; 32]);
        let t = s.issue(ip("10.0.0.1"), 60, 1_000);
        assert_eq!(t.len(), 56);
        assert!(t.bytes().all(|b| b.is_ascii_graphic()));
        assert_eq!(s.verify(&t, ip("10.0.0.1"), 1_059), Ok(()));
        assert_eq!(s.verify(&t, ip("10.0.0.1"), 1_060), Err(Invalid::Expired));
    }

    #[test]
    fn every_put_returns_a_fresh_token_even_in_the_same_second_with_the_same_ttl() {
        let s = Issuer::new([7; 32]);
        let tokens: std::collections::HashSet<String> = (0..1000).map(|_| s.issue(ip("10.0.0.1"), 60, 1_000)).collect();
        assert_eq!(tokens.len(), 1000);
        assert!(tokens.iter().all(|t| s.verify(t, ip("10.0.0.1"), 1_001).is_ok()));
    }

    #[test]
    fn tokens_issued_before_nonces_still_verify_until_they_expire() {
        let s = Issuer::new([7; 32]);
        let mut v1 = vec![VERSION_1];
        v1.extend_from_slice(&1_060u64.to_be_bytes());
        let tag = s.mac(&v1, ip("10.0.0.1")).finalize().into_bytes();
        v1.extend_from_slice(&tag);
        let token = STANDARD.encode(&v1);
        assert_eq!(s.verify(&token, ip("10.0.0.1"), 1_000), Ok(()));
        assert_eq!(s.verify(&token, ip("10.0.0.2"), 1_000), Err(Invalid::WrongCaller));
        assert_eq!(s.verify(&token, ip("10.0.0.1"), 1_060), Err(Invalid::Expired));
        // Relabelling a new token as version 1 does not make it verify.
        let mut relabelled = STANDARD.decode(s.issue(ip("10.0.0.1"), 60, 1_000)).unwrap();
        relabelled[0] = VERSION_1;
        assert_eq!(
            s.verify(&STANDARD.encode(&relabelled), ip("10.0.0.1"), 1_000),
            Err(Invalid::WrongCaller)
        );
    }

    #[test]
    fn a_token_from_another_ip_is_refused() {
        let s = Issuer::new([7; 32]);
        let t = s.issue(ip("10.0.0.1"), 60, 1_000);
        assert_eq!(s.verify(&t, ip("10.0.0.2"), 1_001), Err(Invalid::WrongCaller));
        assert_eq!(s.verify(&t, ip("fd00::1"), 1_001), Err(Invalid::WrongCaller));
    }

    #[test]
    fn a_token_signed_with_another_key_is_refused() {
        let t = Issuer::new([1; 32]).issue(ip("10.0.0.1"), 60, 1_000);
        assert_eq!(
            Issuer::new([2; 32]).verify(&t, ip("10.0.0.1"), 1_001),
            Err(Invalid::WrongCaller)
        );
    }

    #[test]
    fn garbage_and_tampered_tokens_are_refused() {
        let s = Issuer::new([7; 32]);
        for garbage in ["", "x", "AQAEA==", &"A".repeat(56), &"é".repeat(28), &"A".repeat(5000)] {
            assert_eq!(
                s.verify(garbage, ip("10.0.0.1"), 1_000),
                Err(Invalid::Malformed),
                "{garbage:?}"
            );
        }
        // Extending the expiry invalidates the signature.
        let t = s.issue(ip("10.0.0.1"), 60, 1_000);
        let mut bytes = STANDARD.decode(&t).unwrap();
        bytes[8] = bytes[8].wrapping_add(100);
        let forged = STANDARD.encode(bytes);
        assert_eq!(s.verify(&forged, ip("10.0.0.1"), 1_001), Err(Invalid::WrongCaller));
    }

    #[test]
    fn a_key_from_the_same_secret_accepts_the_same_tokens_and_short_secrets_are_refused() {
        let secret = [9u8; 40];
        let t = Issuer::from_secret(&secret).unwrap().issue(ip("10.0.0.1"), 60, 1_000);
        let restarted = Issuer::from_secret(&secret).unwrap();
        assert_eq!(restarted.verify(&t, ip("10.0.0.1"), 1_001), Ok(()));
        let other = Issuer::from_secret(&[8u8; 40]).unwrap();
        assert_eq!(other.verify(&t, ip("10.0.0.1"), 1_001), Err(Invalid::WrongCaller));
        assert!(Issuer::from_secret(&[1u8; 31]).is_none());
    }

    #[test]
    fn ttls_outside_one_to_21600_seconds_are_invalid() {
        assert_eq!(parse_ttl(b"1"), Some(1));
        assert_eq!(parse_ttl(b"21600"), Some(21_600));
        for bad in [
            &b""[..],
            b"0",
            b"21601",
            b"-1",
            b"+5",
            b" 5",
            b"5s",
            b"1e3",
            b"99999999999999999999999",
        ] {
            assert_eq!(parse_ttl(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
