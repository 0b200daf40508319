//! Service-account JWTs as the Kubernetes API server issues them, for the test doubles.
//!
//! Owns the fixed RSA-2048 test signing key (`keys/sa-signer.pem`, a second unrelated key in
//! `keys/other-signer.pem` for "signed by someone else" cases), RS256 signing, the JWKS document with the
//! API server's key id (base64url of the SHA-256 of the DER `SubjectPublicKeyInfo`), the bound-token
//! claim layout (`aud`, `exp`, `iat`, `iss`, `jti`, `kubernetes.io`, `nbf`, `sub`) and RS256
//! verification with zero leeway, as the STS double needs it.
//!
//! Test-only key material: never use these keys for anything else.

use std::fmt;
use std::sync::OnceLock;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rsa::pkcs1v15::{Signature, SigningKey, VerifyingKey};
use rsa::pkcs8::{DecodePrivateKey, EncodePublicKey};
use rsa::signature::{SignatureEncoding as _, Signer as _, Verifier as _};
use rsa::traits::PublicKeyParts;
use rsa::{BigUint, RsaPrivateKey, RsaPublicKey};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// The issuer a default cluster puts in `iss`.
pub const DEFAULT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// The audience STS expects by default (what EKS pod identity webhooks request).
pub const STS_AUDIENCE: &str = "sts.amazonaws.com";

/// PEM (PKCS#8) of the fixed service-account signing key.
pub const TEST_KEY_PEM: &str = include_str!("keys/sa-signer.pem");

/// PEM (PKCS#8) of a second key that no double trusts.
pub const OTHER_KEY_PEM: &str = include_str!("keys/other-signer.pem");

/// Seconds since the Unix epoch, now.
pub fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// A random RFC 4122 version-4 UUID string, as Kubernetes uses for `metadata.uid` and `jti`.
pub fn random_uid() -> String {
    let mut v: u128 = rand::random();
    v = (v & !(0xf << 76)) | (0x4 << 76);
    v = (v & !(0x3 << 62)) | (0x2 << 62);
    let h = format!("{v:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A stable UUID-shaped id derived from `seed` (for objects the doubles do not store, like nodes).
pub fn derived_uid(seed: &str) -> String {
    let h = hex(&Sha256::digest(seed.as_bytes()));
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `{ "name": ..., "uid": ... }` as found under `kubernetes.io`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRef {
    /// Object name.
    pub name: String,
    /// Object UID.
    pub uid: String,
}

/// The private `kubernetes.io` claim of a bound service-account token.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubernetesClaims {
    /// Namespace of the service account.
    pub namespace: String,
    /// The node the bound pod runs on (Kubernetes 1.30+ adds it for pod-bound tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<ObjectRef>,
    /// The pod the token is bound to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<ObjectRef>,
    /// The service account.
    pub serviceaccount: ObjectRef,
    /// Set by the API server for extended-expiry tokens; unused here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warnafter: Option<i64>,
}

/// Claims of a Kubernetes bound service-account token, in the API server's field order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Audiences (always an array when the API server issues; a bare string is accepted on input).
    #[serde(deserialize_with = "one_or_many")]
    pub aud: Vec<String>,
    /// Expiry, Unix seconds.
    pub exp: i64,
    /// Issued at, Unix seconds.
    pub iat: i64,
    /// Issuer.
    pub iss: String,
    /// Unique token id.
    #[serde(default)]
    pub jti: String,
    /// Kubernetes-specific claims (empty in a JWT-SVID, which has none).
    #[serde(rename = "kubernetes.io", default)]
    pub kubernetes: KubernetesClaims,
    /// Not before, Unix seconds (0 when absent, as in a JWT-SVID).
    #[serde(default)]
    pub nbf: i64,
    /// `system:serviceaccount:<namespace>:<name>`.
    pub sub: String,
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

impl Claims {
    /// Claims for service account `namespace/service_account` (UID `sa_uid`), valid from now for
    /// `lifetime_seconds`, with a fresh `jti`. Add the pod and node with [`Claims::with_pod`] and
    /// [`Claims::with_node`].
    pub fn new(
        issuer: &str,
        audiences: Vec<String>,
        namespace: &str,
        service_account: &str,
        sa_uid: &str,
        lifetime_seconds: i64,
    ) -> Self {
        let now = now_unix();
        Self {
            aud: audiences,
            exp: now + lifetime_seconds,
            iat: now,
            iss: issuer.to_owned(),
            jti: random_uid(),
            kubernetes: KubernetesClaims {
                namespace: namespace.to_owned(),
                node: None,
                pod: None,
                serviceaccount: ObjectRef {
                    name: service_account.to_owned(),
                    uid: sa_uid.to_owned(),
                },
                warnafter: None,
            },
            nbf: now,
            sub: subject(namespace, service_account),
        }
    }

    /// Binds the claims to a pod.
    pub fn with_pod(mut self, name: &str, uid: &str) -> Self {
        self.kubernetes.pod = Some(ObjectRef {
            name: name.to_owned(),
            uid: uid.to_owned(),
        });
        self
    }

    /// Records the node the pod runs on.
    pub fn with_node(mut self, name: &str, uid: &str) -> Self {
        self.kubernetes.node = Some(ObjectRef {
            name: name.to_owned(),
            uid: uid.to_owned(),
        });
        self
    }

    /// The bound pod, if any.
    pub fn pod(&self) -> Option<&ObjectRef> {
        self.kubernetes.pod.as_ref()
    }
}

/// `system:serviceaccount:<namespace>:<name>`.
pub fn subject(namespace: &str, service_account: &str) -> String {
    format!("system:serviceaccount:{namespace}:{service_account}")
}

/// An RS256 signer with its key id.
pub struct Signer {
    key: RsaPrivateKey,
    public: RsaPublicKey,
    kid: String,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signer").field("kid", &self.kid).finish_non_exhaustive()
    }
}

impl Signer {
    /// The fixed test key every double shares (parsed once).
    pub fn test_key() -> &'static Signer {
        static KEY: OnceLock<Signer> = OnceLock::new();
        KEY.get_or_init(|| Signer::from_pem(TEST_KEY_PEM))
    }

    /// A second fixed key, trusted by nobody: tokens it signs must be rejected.
    pub fn other_key() -> &'static Signer {
        static KEY: OnceLock<Signer> = OnceLock::new();
        KEY.get_or_init(|| Signer::from_pem(OTHER_KEY_PEM))
    }

    /// A signer from a PKCS#8 PEM private key. Panics on a bad key (test input).
    pub fn from_pem(pem: &str) -> Self {
        let key = RsaPrivateKey::from_pkcs8_pem(pem).expect("PKCS#8 RSA private key");
        let public = key.to_public_key();
        let kid = key_id(&public);
        Self { key, public, kid }
    }

    /// The key id: base64url(SHA-256(DER SubjectPublicKeyInfo)), as the API server computes it.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The JWKS document the API server serves at `/openid/v1/jwks`.
    pub fn jwks(&self) -> Value {
        json!({ "keys": [jwk(&self.public, &self.kid)] })
    }

    /// Signs `claims` with header `{"alg":"RS256","kid":...}`.
    pub fn sign(&self, claims: &Claims) -> String {
        let payload = serde_json::to_value(claims).expect("claims serialize");
        self.sign_value(&json!({ "alg": "RS256", "kid": self.kid }), &payload)
    }

    /// Signs arbitrary header and payload JSON (to craft malformed or hostile tokens).
    pub fn sign_value(&self, header: &Value, payload: &Value) -> String {
        let signing_input = format!("{}.{}", b64_json(header), b64_json(payload));
        let signature = SigningKey::<Sha256>::new(self.key.clone()).sign(signing_input.as_bytes());
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature.to_bytes()))
    }
}

fn b64_json(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).expect("json"))
}

fn key_id(public: &RsaPublicKey) -> String {
    let der = public.to_public_key_der().expect("DER public key");
    URL_SAFE_NO_PAD.encode(Sha256::digest(der.as_bytes()))
}

fn jwk(public: &RsaPublicKey, kid: &str) -> Value {
    json!({
        "use": "sig",
        "kty": "RSA",
        "kid": kid,
        "alg": "RS256",
        "n": URL_SAFE_NO_PAD.encode(public.n().to_bytes_be()),
        "e": URL_SAFE_NO_PAD.encode(public.e().to_bytes_be()),
    })
}

/// Why a token was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyError {
    /// Not three base64url parts of JSON, or claims missing.
    Malformed(String),
    /// `alg` is not RS256.
    UnsupportedAlgorithm(String),
    /// No key with the token's `kid`.
    UnknownKey,
    /// The signature does not verify.
    BadSignature,
    /// `exp` is not in the future.
    Expired {
        /// The token's `exp`.
        exp: i64,
        /// The time of the check.
        now: i64,
    },
    /// `nbf` is in the future.
    NotYetValid,
    /// `aud` does not contain the expected audience.
    WrongAudience {
        /// What was expected.
        expected: String,
        /// What the token carries.
        actual: Vec<String>,
    },
    /// `iss` is not the expected issuer.
    WrongIssuer(String),
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VerifyError::Malformed(why) => write!(f, "malformed token: {why}"),
            VerifyError::UnsupportedAlgorithm(alg) => write!(f, "unsupported algorithm {alg:?}"),
            VerifyError::UnknownKey => write!(f, "no key matches the token's kid"),
            VerifyError::BadSignature => write!(f, "signature verification failed"),
            VerifyError::Expired { exp, now } => write!(f, "token expired at {exp} (now {now})"),
            VerifyError::NotYetValid => write!(f, "token not yet valid"),
            VerifyError::WrongAudience { expected, actual } => {
                write!(f, "audience {actual:?} does not contain {expected:?}")
            }
            VerifyError::WrongIssuer(iss) => write!(f, "unexpected issuer {iss:?}"),
        }
    }
}

impl std::error::Error for VerifyError {}

/// Verifies RS256 tokens against a key set and one issuer, with zero clock leeway.
#[derive(Debug, Clone)]
pub struct Verifier {
    keys: Vec<(Option<String>, RsaPublicKey)>,
    issuer: String,
}

impl Verifier {
    /// From a JWKS document (`{"keys":[{"kty":"RSA","n":..,"e":..,"kid":..}]}`).
    pub fn from_jwks(jwks: &Value, issuer: &str) -> Result<Self, String> {
        let keys = jwks
            .get("keys")
            .and_then(Value::as_array)
            .ok_or("JWKS has no keys array")?
            .iter()
            .filter(|k| k.get("kty").and_then(Value::as_str) == Some("RSA"))
            .map(|k| {
                let part = |name: &str| -> Result<BigUint, String> {
                    let s = k
                        .get(name)
                        .and_then(Value::as_str)
                        .ok_or(format!("JWK without {name}"))?;
                    let bytes = URL_SAFE_NO_PAD.decode(s).map_err(|e| format!("JWK {name}: {e}"))?;
                    Ok(BigUint::from_bytes_be(&bytes))
                };
                let key = RsaPublicKey::new(part("n")?, part("e")?).map_err(|e| e.to_string())?;
                Ok((k.get("kid").and_then(Value::as_str).map(str::to_owned), key))
            })
            .collect::<Result<Vec<_>, String>>()?;
        if keys.is_empty() {
            return Err("JWKS has no RSA keys".into());
        }
        Ok(Self {
            keys,
            issuer: issuer.to_owned(),
        })
    }

    /// The issuer tokens must carry.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Verifies signature, `exp`/`nbf` (now, no leeway), `aud` ∋ `audience` and `iss`.
    pub fn verify(&self, token: &str, audience: &str) -> Result<Claims, VerifyError> {
        self.verify_at(token, audience, now_unix())
    }

    /// As [`Verifier::verify`] at time `now` (Unix seconds).
    pub fn verify_at(&self, token: &str, audience: &str, now: i64) -> Result<Claims, VerifyError> {
        let (header, _) = decode_unverified(token)?;
        let alg = header.get("alg").and_then(Value::as_str).unwrap_or_default();
        if alg != "RS256" {
            return Err(VerifyError::UnsupportedAlgorithm(alg.to_owned()));
        }
        let kid = header.get("kid").and_then(Value::as_str);
        let (signing_input, signature) = token.rsplit_once('.').expect("checked by decode_unverified");
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|e| VerifyError::Malformed(format!("signature: {e}")))?;
        let signature = Signature::try_from(signature.as_slice()).map_err(|_| VerifyError::BadSignature)?;
        let candidates: Vec<&RsaPublicKey> = self
            .keys
            .iter()
            .filter(|(k, _)| k.is_none() || kid.is_none() || k.as_deref() == kid)
            .map(|(_, key)| key)
            .collect();
        if candidates.is_empty() {
            return Err(VerifyError::UnknownKey);
        }
        let verified = candidates.into_iter().any(|key| {
            VerifyingKey::<Sha256>::new(key.clone())
                .verify(signing_input.as_bytes(), &signature)
                .is_ok()
        });
        if !verified {
            return Err(VerifyError::BadSignature);
        }
        // Only now trust the payload.
        let (_, claims) = decode_unverified(token)?;
        let claims: Claims =
            serde_json::from_value(claims).map_err(|e| VerifyError::Malformed(format!("claims: {e}")))?;
        if now >= claims.exp {
            return Err(VerifyError::Expired { exp: claims.exp, now });
        }
        if now < claims.nbf {
            return Err(VerifyError::NotYetValid);
        }
        if claims.iss != self.issuer {
            return Err(VerifyError::WrongIssuer(claims.iss));
        }
        if !claims.aud.iter().any(|a| a == audience) {
            return Err(VerifyError::WrongAudience {
                expected: audience.to_owned(),
                actual: claims.aud,
            });
        }
        Ok(claims)
    }
}

/// Splits and decodes header and payload without checking anything (for inspection in tests).
pub fn decode_unverified(token: &str) -> Result<(Value, Value), VerifyError> {
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 {
        return Err(VerifyError::Malformed(format!("{} parts, expected 3", parts.len())));
    }
    let part = |i: usize| -> Result<Value, VerifyError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(parts[i])
            .map_err(|e| VerifyError::Malformed(format!("part {i}: {e}")))?;
        serde_json::from_slice(&bytes).map_err(|e| VerifyError::Malformed(format!("part {i}: {e}")))
    };
    Ok((part(0)?, part(1)?))
}

/// The claims of `token`, unverified. Panics if it is not a well-formed token (test helper).
pub fn claims_unverified(token: &str) -> Claims {
    let (_, payload) = decode_unverified(token).expect("well-formed JWT");
    serde_json::from_value(payload).expect("Kubernetes claims")
}

/// Rewrites the payload of `token` with `edit`, keeping the original header and signature
/// (so the result must fail signature verification).
pub fn tamper_payload(token: &str, edit: impl FnOnce(&mut Value)) -> String {
    let (header, signature) = match token.split('.').collect::<Vec<_>>()[..] {
        [h, _, s] => (h, s),
        _ => panic!("not a JWT"),
    };
    let (_, mut payload) = decode_unverified(token).expect("well-formed JWT");
    edit(&mut payload);
    format!("{header}.{}.{signature}", b64_json(&payload))
}
