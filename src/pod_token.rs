//! Pod tokens: the projected service-account token a pod presents itself (to the container-credentials
//! endpoint, `Authorization: <token>`), verified here, locally, against the API server's signing keys.
//!
//! [`Keys`] is a JWKS document reduced to what RS256 needs (modulus and exponent per `kid`);
//! [`verify`] checks, in this order, the JWS shape, `alg: RS256`, a known `kid`, the signature, then
//! issuer, audience, not-before and expiry, and returns the pod the token is bound to
//! ([`PodClaims`]). Whether that pod exists on this node and is running is the caller's question:
//! this module knows no pods.
//!
//! Why locally and not with TokenReview: verification costs no API call per request (a node full of
//! pods refreshing credentials would otherwise be a TokenReview storm on the API server), works while
//! the API server is briefly away, and needs no `create tokenreviews` permission. What it gives up:
//! TokenReview also rejects tokens of deleted pods; here the caller checks the bound pod's uid against
//! the node's live pod view instead, which answers the same question for the only pods that matter.
//!
//! [`KeySource`] holds the API server's keys (`/openid/v1/jwks`, fetched on first use) and re-fetches
//! them when a token names a key it does not know, at most once per [`MIN_REFETCH`], so that neither
//! key rotation nor a flood of tokens with made-up key ids costs more than that.
//!
//! Invariants: nothing from the token reaches an error or a log but its `kid` and the names in its
//! claims (never the token, never its signature); an unknown `kid` is its own error so the caller can
//! re-fetch the keys once (rotation) before refusing.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{RSA_PKCS1_2048_8192_SHA256, RsaPublicKeyComponents};
use serde::Deserialize;

/// The least time between two fetches of the key set.
pub const MIN_REFETCH: Duration = Duration::from_secs(10);

/// The longest a key-set fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// How far a node's clock may be behind the API server's when a token is brand new (`nbf`, `iat`).
/// Expiry gets none: the kubelet renews projected tokens at 80% of their life, long before.
pub const NOT_BEFORE_LEEWAY_SECONDS: i64 = 60;

/// The longest token considered (projected tokens are about 1 KiB).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// RSA public keys by key id, from a JWKS document.
#[derive(Debug, Clone, Default)]
pub struct Keys {
    by_kid: HashMap<String, RsaKey>,
}

#[derive(Debug, Clone)]
struct RsaKey {
    n: Vec<u8>,
    e: Vec<u8>,
}

/// Why a JWKS document was not usable.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// Not JSON of the JWKS shape.
    #[error("not a JWKS document: {0}")]
    Shape(#[from] serde_json::Error),
    /// No RSA signing key with a `kid` in it.
    #[error("the JWKS document holds no RSA signing key with a kid")]
    NoKeys,
}

#[derive(Deserialize)]
struct JwksDocument {
    keys: Vec<Jwk>,
}

#[derive(Deserialize)]
struct Jwk {
    kty: String,
    kid: Option<String>,
    #[serde(rename = "use")]
    usage: Option<String>,
    alg: Option<String>,
    n: Option<String>,
    e: Option<String>,
}

impl Keys {
    /// The RSA signing keys of a JWKS document (others, and keys marked for encryption or another
    /// algorithm, are skipped).
    pub fn from_jwks(document: &[u8]) -> Result<Self, KeysError> {
        let document: JwksDocument = serde_json::from_slice(document)?;
        let by_kid: HashMap<_, _> = document
            .keys
            .into_iter()
            .filter(|k| k.kty == "RSA")
            .filter(|k| k.usage.as_deref().is_none_or(|u| u == "sig"))
            .filter(|k| k.alg.as_deref().is_none_or(|a| a == "RS256"))
            .filter_map(|k| {
                let n = URL_SAFE_NO_PAD.decode(k.n?).ok()?;
                let e = URL_SAFE_NO_PAD.decode(k.e?).ok()?;
                Some((k.kid?, RsaKey { n, e }))
            })
            .collect();
        if by_kid.is_empty() {
            return Err(KeysError::NoKeys);
        }
        Ok(Self { by_kid })
    }

    /// Whether a key with this id is known.
    pub fn contains(&self, kid: &str) -> bool {
        self.by_kid.contains_key(kid)
    }

    /// How many keys are known.
    pub fn len(&self) -> usize {
        self.by_kid.len()
    }

    /// Whether no key is known.
    pub fn is_empty(&self) -> bool {
        self.by_kid.is_empty()
    }
}

/// What a token must say besides being signed.
#[derive(Debug, Clone)]
pub struct Expect {
    /// `iss`: the API server's `--service-account-issuer`.
    pub issuer: String,
    /// One of `aud` (`pods.eks.amazonaws.com` by default).
    pub audience: String,
}

/// The pod a verified token is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodClaims {
    /// `kubernetes.io.namespace`.
    pub namespace: String,
    /// `kubernetes.io.pod.name`.
    pub pod_name: String,
    /// `kubernetes.io.pod.uid`.
    pub pod_uid: String,
    /// `kubernetes.io.serviceaccount.name`.
    pub service_account: String,
    /// `kubernetes.io.node.name`: the node the pod was bound to when the token was issued (Kubernetes
    /// 1.30+ writes it; older API servers do not).
    pub node: Option<String>,
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Not three base64url parts with JSON header and claims, or too long.
    #[error("not a JWT")]
    Malformed,
    /// Signed with something other than RS256 (`none` included).
    #[error("algorithm {0:?} is not RS256")]
    Algorithm(String),
    /// Signed with a key not in the key set (rotated keys: re-fetch, then try again).
    #[error("no signing key {0:?}")]
    UnknownKey(String),
    /// The signature does not verify.
    #[error("bad signature")]
    Signature,
    /// Issued by someone else.
    #[error("issuer {0:?} is not this cluster's")]
    Issuer(String),
    /// Meant for someone else.
    #[error("audience is not {0:?}")]
    Audience(String),
    /// Past its `exp`.
    #[error("expired")]
    Expired,
    /// Before its `nbf` (beyond the leeway).
    #[error("not valid yet")]
    NotYetValid,
    /// Not bound to a pod (a Secret-based or unbound token).
    #[error("not bound to a pod")]
    NotPodBound,
}

impl Error {
    /// A closed label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Malformed => "malformed",
            Error::Algorithm(_) => "algorithm",
            Error::UnknownKey(_) => "unknown_key",
            Error::Signature => "signature",
            Error::Issuer(_) => "issuer",
            Error::Audience(_) => "audience",
            Error::Expired => "expired",
            Error::NotYetValid => "not_yet_valid",
            Error::NotPodBound => "not_pod_bound",
        }
    }
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    kid: Option<String>,
}

#[derive(Deserialize)]
struct Claims {
    iss: String,
    aud: Audience,
    exp: i64,
    nbf: Option<i64>,
    #[serde(rename = "kubernetes.io")]
    kubernetes: Option<KubernetesClaims>,
}

#[derive(Deserialize)]
struct KubernetesClaims {
    namespace: String,
    node: Option<NodeRef>,
    pod: Option<ObjectRef>,
    serviceaccount: ObjectRef,
}

#[derive(Deserialize)]
struct NodeRef {
    name: String,
}

#[derive(Deserialize)]
struct ObjectRef {
    name: String,
    uid: String,
}

/// `aud`: RFC 7519 allows one string or an array (the API server always writes an array).
#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    fn names(&self, audience: &str) -> bool {
        match self {
            Audience::One(one) => one == audience,
            Audience::Many(many) => many.iter().any(|a| a == audience),
        }
    }
}

/// Verifies `token` at Unix time `now`; the pod it is bound to.
pub fn verify(token: &str, keys: &Keys, expect: &Expect, now: i64) -> Result<PodClaims, Error> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(Error::Malformed);
    }
    let mut parts = token.split('.');
    let (Some(header), Some(claims), Some(signature), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Error::Malformed);
    };
    let decode = |part: &str| URL_SAFE_NO_PAD.decode(part).map_err(|_| Error::Malformed);
    let header: Header = serde_json::from_slice(&decode(header)?).map_err(|_| Error::Malformed)?;
    if header.alg != "RS256" {
        return Err(Error::Algorithm(header.alg));
    }
    let kid = header.kid.unwrap_or_default();
    let key = keys.by_kid.get(&kid).ok_or(Error::UnknownKey(kid))?;
    let signed = &token[..token.len() - signature.len() - 1];
    RsaPublicKeyComponents { n: &key.n, e: &key.e }
        .verify(&RSA_PKCS1_2048_8192_SHA256, signed.as_bytes(), &decode(signature)?)
        .map_err(|_| Error::Signature)?;
    let claims: Claims = serde_json::from_slice(&decode(claims)?).map_err(|_| Error::Malformed)?;
    if claims.iss != expect.issuer {
        return Err(Error::Issuer(claims.iss));
    }
    if !claims.aud.names(&expect.audience) {
        return Err(Error::Audience(expect.audience.clone()));
    }
    if now >= claims.exp {
        return Err(Error::Expired);
    }
    if claims.nbf.is_some_and(|nbf| now + NOT_BEFORE_LEEWAY_SECONDS < nbf) {
        return Err(Error::NotYetValid);
    }
    let kubernetes = claims.kubernetes.ok_or(Error::NotPodBound)?;
    let pod = kubernetes.pod.ok_or(Error::NotPodBound)?;
    Ok(PodClaims {
        namespace: kubernetes.namespace,
        pod_name: pod.name,
        pod_uid: pod.uid,
        service_account: kubernetes.serviceaccount.name,
        node: kubernetes.node.map(|n| n.name),
    })
}

/// Why no key set could be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    /// The API server failed, refused or did not answer in time.
    #[error("fetching /openid/v1/jwks from the API server: {0}")]
    Unavailable(String),
    /// It answered something that is not a usable key set.
    #[error("the API server's /openid/v1/jwks: {0}")]
    Unusable(String),
}

/// Why [`KeySource::verify`] refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SourceError {
    /// The token itself is bad (final for this token).
    #[error(transparent)]
    Token(#[from] Error),
    /// The keys could not be had (may change soon).
    #[error(transparent)]
    Keys(#[from] FetchError),
}

struct Fetched {
    keys: Arc<Keys>,
    at: Option<tokio::time::Instant>,
}

/// The API server's signing keys, fetched when first needed and again when a token names an unknown
/// key (at most once per [`MIN_REFETCH`]).
pub struct KeySource {
    client: kube::Client,
    current: RwLock<Fetched>,
    fetching: tokio::sync::Mutex<()>,
}

impl KeySource {
    /// A source reading the keys through `client` (nothing is fetched yet).
    pub fn new(client: kube::Client) -> Self {
        Self {
            client,
            current: RwLock::new(Fetched {
                keys: Arc::default(),
                at: None,
            }),
            fetching: tokio::sync::Mutex::new(()),
        }
    }

    /// [`verify`] with the current keys; an unknown key id (or no keys yet) fetches them first.
    pub async fn verify(&self, token: &str, expect: &Expect, now: i64) -> Result<PodClaims, SourceError> {
        let keys = self.keys();
        match verify(token, &keys, expect, now) {
            Err(Error::UnknownKey(_)) => {}
            other => return Ok(other?),
        }
        let keys = self.refetch(&keys).await?;
        Ok(verify(token, &keys, expect, now)?)
    }

    fn keys(&self) -> Arc<Keys> {
        self.current.read().expect("key set lock poisoned").keys.clone()
    }

    /// Fetches the keys unless another caller did since `seen` was read, or the last fetch is younger
    /// than [`MIN_REFETCH`]; the keys to verify with.
    async fn refetch(&self, seen: &Arc<Keys>) -> Result<Arc<Keys>, FetchError> {
        let _one_at_a_time = self.fetching.lock().await;
        {
            let current = self.current.read().expect("key set lock poisoned");
            let recent = current.at.is_some_and(|at| at.elapsed() < MIN_REFETCH);
            if !Arc::ptr_eq(&current.keys, seen) || (recent && !current.keys.is_empty()) {
                return Ok(current.keys.clone());
            }
            if recent {
                return Err(FetchError::Unavailable("the last fetch failed moments ago".into()));
            }
        }
        let fetched = self.fetch().await;
        let mut current = self.current.write().expect("key set lock poisoned");
        current.at = Some(tokio::time::Instant::now());
        let keys = Arc::new(fetched?);
        tracing::info!(
            keys = keys.len(),
            "fetched the API server's service-account signing keys"
        );
        current.keys = keys.clone();
        Ok(keys)
    }

    async fn fetch(&self) -> Result<Keys, FetchError> {
        let request = http::Request::get("/openid/v1/jwks")
            .body(Vec::new())
            .map_err(|e| FetchError::Unavailable(e.to_string()))?;
        let text = tokio::time::timeout(FETCH_TIMEOUT, self.client.request_text(request))
            .await
            .map_err(|_| FetchError::Unavailable(format!("no answer within {FETCH_TIMEOUT:?}")))?
            .map_err(|e| FetchError::Unavailable(e.to_string()))?;
        Keys::from_jwks(text.as_bytes()).map_err(|e| FetchError::Unusable(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use rsa::pkcs1v15::SigningKey;
    use rsa::pkcs8::DecodePrivateKey;
    use rsa::signature::{SignatureEncoding as _, Signer as _};
    use rsa::traits::PublicKeyParts;
    use serde_json::{Value, json};

    use super::*;

    const ISSUER: &str = "https://kubernetes.default.svc";
    const AUDIENCE: &str = "pods.eks.amazonaws.com";
    const NOW: i64 = 1_800_000_000;

    fn private(pem: &str) -> rsa::RsaPrivateKey {
        rsa::RsaPrivateKey::from_pkcs8_pem(pem).unwrap()
    }

    fn signer() -> rsa::RsaPrivateKey {
        private(include_str!("../tests/support/keys/sa-signer.pem"))
    }

    fn other_signer() -> rsa::RsaPrivateKey {
        private(include_str!("../tests/support/keys/other-signer.pem"))
    }

    fn jwk(key: &rsa::RsaPrivateKey, kid: &str) -> Value {
        let public = key.to_public_key();
        json!({
            "kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid,
            "n": URL_SAFE_NO_PAD.encode(public.n().to_bytes_be()),
            "e": URL_SAFE_NO_PAD.encode(public.e().to_bytes_be()),
        })
    }

    fn keys(jwks: &[Value]) -> Keys {
        Keys::from_jwks(json!({ "keys": jwks }).to_string().as_bytes()).unwrap()
    }

    fn claims() -> Value {
        json!({
            "aud": [AUDIENCE], "exp": NOW + 600, "iat": NOW - 10, "nbf": NOW - 10, "iss": ISSUER,
            "sub": "system:serviceaccount:apps:reader",
            "kubernetes.io": {
                "namespace": "apps",
                "node": { "name": "node-a", "uid": "5f0c7a2e-1d3b-4c4a-9e8f-0a1b2c3d4e5f" },
                "pod": { "name": "reader-0", "uid": "0b9b7f4e-2c1a-4c52-9a55-1f8f3f2d0a11" },
                "serviceaccount": { "name": "reader", "uid": "7d1c0a7e-5a7b-4bde-8c8e-2a3c4d5e6f70" },
            },
        })
    }

    fn sign(key: &rsa::RsaPrivateKey, header: &Value, claims: &Value) -> String {
        let signing = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature = SigningKey::<sha2::Sha256>::new(key.clone()).sign(signing.as_bytes());
        format!("{signing}.{}", URL_SAFE_NO_PAD.encode(signature.to_bytes()))
    }

    fn token(claims: &Value) -> String {
        sign(&signer(), &json!({ "alg": "RS256", "kid": "k1" }), claims)
    }

    fn expect() -> Expect {
        Expect {
            issuer: ISSUER.into(),
            audience: AUDIENCE.into(),
        }
    }

    fn check(token: &str) -> Result<PodClaims, Error> {
        verify(token, &keys(&[jwk(&signer(), "k1")]), &expect(), NOW)
    }

    #[test]
    fn a_good_token_names_the_pod_it_is_bound_to() {
        assert_eq!(
            check(&token(&claims())),
            Ok(PodClaims {
                namespace: "apps".into(),
                pod_name: "reader-0".into(),
                pod_uid: "0b9b7f4e-2c1a-4c52-9a55-1f8f3f2d0a11".into(),
                service_account: "reader".into(),
                node: Some("node-a".into()),
            })
        );
    }

    #[test]
    fn each_bad_claim_is_refused_for_its_own_reason() {
        let with = |key: &str, value: Value| {
            let mut c = claims();
            c[key] = value;
            check(&token(&c))
        };
        assert_eq!(
            with("iss", json!("https://elsewhere")),
            Err(Error::Issuer("https://elsewhere".into()))
        );
        assert_eq!(
            with("aud", json!(["sts.amazonaws.com"])),
            Err(Error::Audience(AUDIENCE.into()))
        );
        assert!(with("aud", json!(AUDIENCE)).is_ok(), "a bare string audience");
        assert_eq!(with("exp", json!(NOW)), Err(Error::Expired));
        assert_eq!(with("exp", json!(NOW - 1)), Err(Error::Expired));
        assert!(
            with("nbf", json!(NOW + NOT_BEFORE_LEEWAY_SECONDS)).is_ok(),
            "within the leeway"
        );
        assert_eq!(
            with("nbf", json!(NOW + NOT_BEFORE_LEEWAY_SECONDS + 1)),
            Err(Error::NotYetValid)
        );
        let mut unbound = claims();
        unbound["kubernetes.io"].as_object_mut().unwrap().remove("pod");
        assert_eq!(check(&token(&unbound)), Err(Error::NotPodBound));
        let mut legacy = claims();
        legacy.as_object_mut().unwrap().remove("kubernetes.io");
        assert_eq!(check(&token(&legacy)), Err(Error::NotPodBound));
    }

    #[test]
    fn forged_altered_and_unsigned_tokens_are_refused() {
        let good = token(&claims());
        let forged = sign(&other_signer(), &json!({ "alg": "RS256", "kid": "k1" }), &claims());
        assert_eq!(check(&forged), Err(Error::Signature));
        let mut other_pod = claims();
        other_pod["kubernetes.io"]["pod"]["uid"] = json!("ffffffff-2c1a-4c52-9a55-1f8f3f2d0a11");
        let parts: Vec<&str> = good.split('.').collect();
        let spliced = format!(
            "{}.{}.{}",
            parts[0],
            URL_SAFE_NO_PAD.encode(other_pod.to_string()),
            parts[2]
        );
        assert_eq!(check(&spliced), Err(Error::Signature));
        let none = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(json!({ "alg": "none", "kid": "k1" }).to_string()),
            parts[1]
        );
        assert_eq!(check(&none), Err(Error::Algorithm("none".into())));
        let hs = sign(&signer(), &json!({ "alg": "HS256", "kid": "k1" }), &claims());
        assert_eq!(check(&hs), Err(Error::Algorithm("HS256".into())));
        for garbage in ["", "a.b", "a.b.c.d", "!!.!!.!!", "Bearer x.y.z", &format!("{good}x")] {
            assert!(
                matches!(check(garbage), Err(Error::Malformed | Error::Signature)),
                "{garbage:?}: {:?}",
                check(garbage)
            );
        }
        assert_eq!(check(&"a".repeat(MAX_TOKEN_BYTES + 1)), Err(Error::Malformed));
    }

    #[test]
    fn an_unknown_kid_is_its_own_error_and_rotated_keys_verify_once_fetched() {
        let rotated = sign(&other_signer(), &json!({ "alg": "RS256", "kid": "k2" }), &claims());
        assert_eq!(check(&rotated), Err(Error::UnknownKey("k2".into())));
        // After a re-fetch the set holds the old and the new key, as the API server publishes both
        // while tokens signed with the old one are still live.
        let both = keys(&[jwk(&signer(), "k1"), jwk(&other_signer(), "k2")]);
        assert!(verify(&rotated, &both, &expect(), NOW).is_ok());
        assert!(verify(&token(&claims()), &both, &expect(), NOW).is_ok());
        let no_kid = sign(&signer(), &json!({ "alg": "RS256" }), &claims());
        assert_eq!(check(&no_kid), Err(Error::UnknownKey(String::new())));
    }

    #[test]
    fn only_rsa_signing_keys_with_an_id_are_taken_from_a_jwks() {
        let mut encryption = jwk(&signer(), "enc");
        encryption["use"] = json!("enc");
        let mut nameless = jwk(&signer(), "x");
        nameless.as_object_mut().unwrap().remove("kid");
        let ec = json!({ "kty": "EC", "kid": "ec", "crv": "P-256", "x": "AA", "y": "AA" });
        let set = keys(&[encryption, nameless, ec, jwk(&signer(), "k1")]);
        assert_eq!(set.len(), 1);
        assert!(set.contains("k1") && !set.contains("enc") && !set.contains("ec"));
        assert!(matches!(Keys::from_jwks(br#"{"keys": []}"#), Err(KeysError::NoKeys)));
        assert!(matches!(Keys::from_jwks(b"<html>"), Err(KeysError::Shape(_))));
    }
}
