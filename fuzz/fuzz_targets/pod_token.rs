//! Pod tokens (`pod_token::verify`): what any process that can reach the container-credentials
//! endpoint may put in its `Authorization` header.
//!
//! Input: the header value. Keys: the kube double's published test key (public part only). Checks that
//! verification never panics, and that nothing verifies but the one token that key signed (the seed in
//! fuzz/corpus/pod_token/, a token the kube double minted through TokenRequest): no mutation of it —
//! header, claims, signature, encoding — and no other input is accepted.

#![no_main]

use std::sync::LazyLock;

use imds_broker::pod_token::{Expect, Keys, verify};
use libfuzzer_sys::fuzz_target;

/// The kube double's `/openid/v1/jwks` (tests/support/keys/sa-signer.pem's public key).
const JWKS: &str = r#"{"keys":[{"alg":"RS256","e":"AQAB","kid":"8PJy-Hnqv4zYAeFhEiTCTqC2iY2OujeXglC9xkmuHA0","kty":"RSA","n":"0R_nyDCIXTxGznRj-b2EZcQOlmgIGcKogcmE9oidFxJoO4BmUAIJNq3mY3atST9G1AOhr8jx0VwnbAVZxlk_ePRSzxeZOfkFsagTtaxPMqQkusCih6tdptaILUV_xL8OFUNhXlX10x-79DLXTT24tPW1VjphOEY5GWFE3lNNnpLoU90eYuVXCDIicmLNRxtWhBz_hJCMD3BWIHPnOS0_mBNarpID7_yFaDztO-S1H0BOg0d7b_2XOVgercenePrsrfRuYiil2a7gKVvVAPQpMkIIkxNYvVrD-Wg5Wrn2EfLtzfKqJGY9NfNNU-glBdd79xxPDEltH65954nNPorG_w","use":"sig"}]}"#;

/// The seed token, the only input that may verify.
const SEED: &str = include_str!("../corpus/pod_token/seed.jwt");

/// Within the seed's validity (its `iat` plus a second).
const NOW: i64 = 1_796_219_727;

static KEYS: LazyLock<Keys> = LazyLock::new(|| Keys::from_jwks(JWKS.as_bytes()).expect("the test JWKS"));

fuzz_target!(|data: &[u8]| {
    // Header values reach the handler as bytes; only text can be a token.
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let expect = Expect {
        issuer: "https://kubernetes.default.svc.cluster.local".into(),
        audience: "pods.eks.amazonaws.com".into(),
    };
    match verify(token, &KEYS, &expect, NOW) {
        Ok(claims) => {
            assert_eq!(token, SEED.trim_end(), "only the signed token verifies");
            assert_eq!((claims.namespace.as_str(), claims.pod_name.as_str()), ("default", "app-0"));
        }
        Err(error) => {
            let _ = error.kind();
        }
    }
});
