//! `imds-broker oidc export` and `oidc export --check`: the cluster's service-account issuer
//! documents, laid out for static hosting (an S3 bucket, any HTTPS server) so that IAM can fetch them,
//! and the check that a published copy still holds exactly the API server's signing keys.
//!
//! The layout is the API server's own: `<dir>/.well-known/openid-configuration` and
//! `<dir>/openid/v1/jwks`, with `jwks_uri` pointing at `<issuer>/openid/v1/jwks`. IAM trusts a token
//! only when its `iss` is the provider's URL, so the documents are written only when the API server's
//! `issuer` (its `--service-account-issuer`) is the public URL they are published at.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use serde_json::Value;

/// Where the discovery document lives, relative to the issuer.
pub const DISCOVERY_PATH: &str = ".well-known/openid-configuration";
/// Where the key set lives, relative to the issuer (the API server's path).
pub const JWKS_PATH: &str = "openid/v1/jwks";

/// The largest document read (a key set holds a few keys).
const MAX_DOCUMENT: usize = 1 << 20;
/// How long one fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the documents could not be exported or checked.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server refused or failed.
    #[error("reading {path} from the API server: {source}")]
    Kube {
        /// The path asked.
        path: &'static str,
        /// What went wrong.
        #[source]
        source: kube::Error,
    },
    /// A published copy could not be fetched.
    #[error("fetching {url}: {reason}")]
    Fetch {
        /// What was fetched.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// A document is not what its path promises.
    #[error("{what} is not a valid document: {reason}")]
    Invalid {
        /// Which document.
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The API server's issuer is not the URL the documents are to be published at.
    #[error(
        "the API server's issuer is {live:?}, not --issuer-url {wanted:?}: IAM accepts a token only when its `iss` is \
         the provider's URL, so the API server's --service-account-issuer must be that public URL (keep the old \
         issuer in a second --service-account-issuer while pods' tokens roll over)"
    )]
    IssuerMismatch {
        /// What the API server says.
        live: String,
        /// What was asked for.
        wanted: String,
    },
    /// Writing the files failed.
    #[error("writing {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
}

/// The two documents.
#[derive(Debug, Clone, PartialEq)]
pub struct Documents {
    /// The discovery document.
    pub discovery: Value,
    /// The key set.
    pub jwks: Value,
}

impl Documents {
    /// The `issuer` of the discovery document.
    pub fn issuer(&self) -> &str {
        self.discovery.get("issuer").and_then(Value::as_str).unwrap_or_default()
    }

    /// The keys by `kid`.
    pub fn keys(&self) -> BTreeMap<String, &Value> {
        self.jwks
            .get("keys")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|key| Some((key.get("kid")?.as_str()?.to_owned(), key)))
            .collect()
    }
}

/// Both documents as the API server serves them.
pub async fn live(client: &kube::Client) -> Result<Documents, Error> {
    let documents = Documents {
        discovery: get(client, DISCOVERY).await?,
        jwks: get(client, "/openid/v1/jwks").await?,
    };
    validate(&documents, "the API server's")?;
    Ok(documents)
}

/// The API server's issuer, from its discovery document alone.
pub async fn live_issuer(client: &kube::Client) -> Result<String, Error> {
    let discovery = get(client, DISCOVERY).await?;
    match discovery.get("issuer").and_then(Value::as_str) {
        Some(issuer) if !issuer.is_empty() => Ok(issuer.to_owned()),
        _ => Err(Error::Invalid {
            what: "the API server's discovery document".into(),
            reason: "no issuer".into(),
        }),
    }
}

/// The API server's discovery document.
const DISCOVERY: &str = "/.well-known/openid-configuration";

async fn get(client: &kube::Client, path: &'static str) -> Result<Value, Error> {
    let request = http::Request::get(path).body(Vec::new()).map_err(|e| Error::Invalid {
        what: path.into(),
        reason: e.to_string(),
    })?;
    let text = client
        .request_text(request)
        .await
        .map_err(|source| Error::Kube { path, source })?;
    parse(path, text.as_bytes())
}

fn parse(what: &str, bytes: &[u8]) -> Result<Value, Error> {
    serde_json::from_slice(bytes).map_err(|e| Error::Invalid {
        what: what.into(),
        reason: e.to_string(),
    })
}

fn validate(documents: &Documents, whose: &str) -> Result<(), Error> {
    let invalid = |what: &str, reason: &str| Error::Invalid {
        what: format!("{whose} {what}"),
        reason: reason.into(),
    };
    if documents.issuer().is_empty() {
        return Err(invalid("discovery document", "no issuer"));
    }
    let keys = documents.jwks.get("keys").and_then(Value::as_array);
    match keys {
        None => Err(invalid("key set", "no keys array")),
        Some(keys) if keys.iter().any(|k| k.get("kid").and_then(Value::as_str).is_none()) => {
            Err(invalid("key set", "a key without a kid"))
        }
        Some(_) => Ok(()),
    }
}

fn trimmed(url: &str) -> &str {
    url.strip_suffix('/').unwrap_or(url)
}

/// The documents to publish at `issuer_url`: the live ones, with `jwks_uri` pointing at the published
/// key set. Refused when the API server's issuer is another URL.
pub fn for_publication(live: &Documents, issuer_url: &str) -> Result<Documents, Error> {
    if trimmed(live.issuer()) != trimmed(issuer_url) {
        return Err(Error::IssuerMismatch {
            live: live.issuer().to_owned(),
            wanted: issuer_url.to_owned(),
        });
    }
    let mut published = live.clone();
    published.discovery["jwks_uri"] = Value::String(format!("{}/{JWKS_PATH}", trimmed(live.issuer())));
    Ok(published)
}

/// Writes both documents under `dir` in the hosting layout; returns the files written.
pub fn write(documents: &Documents, dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let mut written = Vec::new();
    for (relative, value) in [(DISCOVERY_PATH, &documents.discovery), (JWKS_PATH, &documents.jwks)] {
        let path = dir.join(relative);
        let failed = |source| Error::Write {
            path: path.clone(),
            source,
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(failed)?;
        }
        let mut text = serde_json::to_string_pretty(value).map_err(|e| failed(std::io::Error::other(e)))?;
        text.push('\n');
        std::fs::write(&path, text).map_err(failed)?;
        written.push(path);
    }
    Ok(written)
}

/// A published copy: a directory in the hosting layout, or the URL it is served at.
pub async fn published(location: &str) -> Result<Documents, Error> {
    let documents = if location.starts_with("http://") || location.starts_with("https://") {
        let base = trimmed(location);
        let client = http_client().map_err(|reason| Error::Fetch {
            url: location.to_owned(),
            reason,
        })?;
        Documents {
            discovery: parse(
                DISCOVERY_PATH,
                &fetch(&client, &format!("{base}/{DISCOVERY_PATH}")).await?,
            )?,
            jwks: parse(JWKS_PATH, &fetch(&client, &format!("{base}/{JWKS_PATH}")).await?)?,
        }
    } else {
        let read = |relative: &str| {
            let path = Path::new(location).join(relative);
            std::fs::read(&path).map_err(|e| Error::Fetch {
                url: path.display().to_string(),
                reason: e.to_string(),
            })
        };
        Documents {
            discovery: parse(DISCOVERY_PATH, &read(DISCOVERY_PATH)?)?,
            jwks: parse(JWKS_PATH, &read(JWKS_PATH)?)?,
        }
    };
    validate(&documents, "the published")?;
    Ok(documents)
}

type HttpClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Empty<Bytes>,
>;

/// An HTTP(S) client trusting the system's CA certificates.
fn http_client() -> Result<HttpClient, String> {
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_native_roots()
        .map_err(|e| format!("no CA certificates: {e}"))?
        .https_or_http()
        .enable_http1()
        .build();
    Ok(hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector))
}

async fn fetch(client: &HttpClient, url: &str) -> Result<Vec<u8>, Error> {
    let failed = |reason: String| Error::Fetch {
        url: url.to_owned(),
        reason,
    };
    let uri: http::Uri = url.parse().map_err(|e: http::uri::InvalidUri| failed(e.to_string()))?;
    let response = tokio::time::timeout(FETCH_TIMEOUT, client.get(uri))
        .await
        .map_err(|_| failed(format!("no answer within {FETCH_TIMEOUT:?}")))?
        .map_err(|e| failed(e.to_string()))?;
    if !response.status().is_success() {
        return Err(failed(format!("HTTP {}", response.status())));
    }
    let body = Limited::new(response.into_body(), MAX_DOCUMENT)
        .collect()
        .await
        .map_err(|e| failed(e.to_string()))?;
    Ok(body.to_bytes().to_vec())
}

/// How a published copy differs from the live documents.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Drift {
    /// The published issuer, when it is not the live one.
    pub issuer: Option<String>,
    /// The published `jwks_uri`, when it is not `<issuer>/openid/v1/jwks`.
    pub jwks_uri: Option<String>,
    /// Keys the API server signs with that are not published: tokens signed with them fail at STS.
    pub missing: Vec<String>,
    /// Published keys the API server no longer has.
    pub extra: Vec<String>,
    /// Keys published under a live `kid` with other key material.
    pub changed: Vec<String>,
}

impl Drift {
    /// Whether the copy is exactly what would be published now.
    pub fn is_empty(&self) -> bool {
        *self == Drift::default()
    }
}

impl std::fmt::Display for Drift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(issuer) = &self.issuer {
            writeln!(f, "published issuer {issuer:?} is not the API server's")?;
        }
        if let Some(uri) = &self.jwks_uri {
            writeln!(f, "published jwks_uri {uri:?} is not <issuer>/{JWKS_PATH}")?;
        }
        for (what, kids) in [
            ("missing (the API server signs with it; publish it)", &self.missing),
            ("extra (the API server no longer has it)", &self.extra),
            ("changed (other key material under the same kid)", &self.changed),
        ] {
            for kid in kids {
                writeln!(f, "key {kid:?} {what}")?;
            }
        }
        Ok(())
    }
}

/// Compares a published copy with the live documents.
pub fn drift(live: &Documents, published: &Documents) -> Drift {
    let (live_keys, published_keys) = (live.keys(), published.keys());
    let expected_uri = format!("{}/{JWKS_PATH}", trimmed(live.issuer()));
    let published_uri = published
        .discovery
        .get("jwks_uri")
        .and_then(Value::as_str)
        .unwrap_or_default();
    Drift {
        issuer: (trimmed(published.issuer()) != trimmed(live.issuer())).then(|| published.issuer().to_owned()),
        jwks_uri: (published_uri != expected_uri).then(|| published_uri.to_owned()),
        missing: live_keys
            .keys()
            .filter(|k| !published_keys.contains_key(*k))
            .cloned()
            .collect(),
        extra: published_keys
            .keys()
            .filter(|k| !live_keys.contains_key(*k))
            .cloned()
            .collect(),
        changed: live_keys
            .iter()
            .filter(|(kid, key)| published_keys.get(*kid).is_some_and(|p| p != *key))
            .map(|(kid, _)| kid.clone())
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn documents(issuer: &str, keys: &[(&str, &str)]) -> Documents {
        Documents {
            discovery: json!({ "issuer": issuer, "jwks_uri": "https://10.0.0.1:6443/openid/v1/jwks" }),
            jwks: json!({ "keys": keys.iter().map(|(kid, n)| json!({ "kid": kid, "kty": "RSA", "n": n, "e": "AQAB" })).collect::<Vec<_>>() }),
        }
    }

    #[test]
    fn publication_points_jwks_uri_at_the_public_issuer_and_refuses_another_issuer() {
        let live = documents("https://oidc.example.com/prod", &[("a", "n1")]);
        let published = for_publication(&live, "https://oidc.example.com/prod/").unwrap();
        assert_eq!(
            published.discovery["jwks_uri"],
            "https://oidc.example.com/prod/openid/v1/jwks"
        );
        assert_eq!(published.jwks, live.jwks);
        let error = for_publication(&live, "https://elsewhere.example.com")
            .unwrap_err()
            .to_string();
        assert!(error.contains("--service-account-issuer"), "{error}");
        assert!(drift(&live, &published).jwks_uri.is_none() && drift(&live, &published).is_empty());
    }

    #[test]
    fn drift_names_missing_extra_and_changed_keys() {
        let live = documents("https://oidc.example.com", &[("a", "n1"), ("b", "n2"), ("c", "n3")]);
        let mut published = for_publication(&live, "https://oidc.example.com").unwrap();
        assert!(drift(&live, &published).is_empty());
        published.jwks = documents("", &[("a", "n1"), ("b", "other"), ("old", "n0")]).jwks;
        let found = drift(&live, &published);
        assert_eq!(found.missing, vec!["c"]);
        assert_eq!(found.extra, vec!["old"]);
        assert_eq!(found.changed, vec!["b"]);
        let text = found.to_string();
        assert!(text.contains("\"c\" missing") && text.contains("\"old\" extra") && text.contains("\"b\" changed"));
    }

    #[test]
    fn documents_without_issuer_or_kids_are_invalid() {
        assert!(validate(&documents("", &[]), "the").is_err());
        let mut keyless = documents("https://x.example.com", &[]);
        keyless.jwks = json!({ "keys": [{ "kty": "RSA" }] });
        assert!(validate(&keyless, "the").is_err());
        assert!(validate(&documents("https://x.example.com", &[("a", "n")]), "the").is_ok());
    }

    #[tokio::test]
    async fn an_https_fetch_has_a_tls_stack_and_fails_with_the_url_named() {
        // Port 9 on loopback: nothing listens. Building the client builds the TLS configuration (crypto
        // provider, roots), so a missing provider would panic here.
        let client = http_client().unwrap();
        let error = fetch(&client, "https://127.0.0.1:9/x").await.unwrap_err().to_string();
        assert!(error.contains("https://127.0.0.1:9/x"), "{error}");
    }
}
