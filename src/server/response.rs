//! The one place where outcomes become HTTP: status codes and headers exactly as EC2's IMDS sends them
//! (`Server: EC2ws`, `text/plain` everywhere, XHTML error pages); the documents themselves are
//! [`super::document`]'s.
//!
//! Every refusal the IMDS handler can produce is a [`Failure`] variant, and [`Failure::into_response`]
//! is the only code that chooses a status for it.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use time::OffsetDateTime;

use super::document;
use crate::credentials;
use crate::workload::RoleArn;

/// The response body type of both servers.
pub type Body = Full<Bytes>;

/// Why an IMDS request was not answered with a document.
#[derive(Debug)]
pub enum Failure {
    /// The request target is not a clean path (dot segments, encodings, backslashes, control bytes).
    BadPath,
    /// The request target is longer than the router takes.
    TargetTooLong,
    /// The request's headers are larger than the endpoint takes.
    HeadersTooLarge,
    /// Token request without a valid TTL header.
    BadTtl,
    /// Token request carrying `X-Forwarded-For`: it came through a proxy, refuse as EC2 does.
    Forwarded,
    /// Token request on a versioned path (`/2021-03-23/api/token`).
    VersionedTokenPath,
    /// Method not allowed on this path; carries the `Allow` header value.
    MethodNotAllowed(&'static str),
    /// The IMDSv2 token is invalid, expired, or from another caller.
    BadToken,
    /// IMDSv1 request while IMDSv2 is required.
    TokenRequired,
    /// No such resource, or nothing for this caller: unknown IP, no role, wrong role name.
    NotFound,
    /// The pod's role annotation is invalid; answered like "no role" so nothing leaks.
    InvalidRole,
    /// The role could not be assumed; the SDK should give up (no credentials).
    Refused {
        /// The pod's role.
        role: RoleArn,
        /// Why it could not be assumed.
        error: credentials::Error,
    },
    /// STS or the API server failed transiently; the SDK may retry.
    Unavailable,
    /// The pod view cannot say who is calling yet: not yet listed, relisting after missed events, or
    /// the API server is unreachable and the address is not known.
    Unsynced,
    /// The address is in flux: several live pods claim it, or only pods that cannot be running.
    Contested,
    /// The node's IMDS failed while proxying an allowed metadata path.
    Upstream(crate::metadata::UpstreamError),
}

impl Failure {
    /// A closed label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Failure::BadPath => "bad_path",
            Failure::TargetTooLong => "target_too_long",
            Failure::HeadersTooLarge => "headers_too_large",
            Failure::BadTtl => "bad_ttl",
            Failure::Forwarded => "forwarded",
            Failure::VersionedTokenPath => "versioned_token_path",
            Failure::MethodNotAllowed(_) => "method_not_allowed",
            Failure::BadToken => "bad_token",
            Failure::TokenRequired => "token_required",
            Failure::NotFound => "not_found",
            Failure::InvalidRole => "invalid_role",
            Failure::Refused { .. } => "refused",
            Failure::Unavailable => "unavailable",
            Failure::Unsynced => "unsynced",
            Failure::Contested => "contested",
            Failure::Upstream(_) => "upstream",
        }
    }

    /// The response EC2 would give.
    pub fn into_response(self) -> Response<Body> {
        match self {
            Failure::BadPath | Failure::BadTtl => error_page(StatusCode::BAD_REQUEST, "400 - Bad Request"),
            Failure::TargetTooLong => error_page(StatusCode::URI_TOO_LONG, "414 - Request-URI Too Large"),
            Failure::HeadersTooLarge => error_page(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "431 - Request Header Fields Too Large",
            ),
            Failure::Forwarded | Failure::VersionedTokenPath => empty(StatusCode::FORBIDDEN),
            Failure::MethodNotAllowed(allow) => {
                let mut response = empty(StatusCode::METHOD_NOT_ALLOWED);
                response
                    .headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static(allow));
                response
            }
            Failure::BadToken | Failure::TokenRequired => error_page(StatusCode::UNAUTHORIZED, "401 - Unauthorized"),
            Failure::NotFound | Failure::InvalidRole => error_page(StatusCode::NOT_FOUND, "404 - Not Found"),
            // EC2 answers 200 with a non-Success code when the instance role cannot be assumed; every SDK
            // read treats that as "no credentials" (botocore returns none, Go/Rust/JS error out).
            Failure::Refused { role, error } => {
                let message = format!(
                    "Could not assume role {} ({}): see the imds-broker log for this pod",
                    role.name(),
                    refusal_code(&error)
                );
                text(
                    StatusCode::OK,
                    document::json(&[
                        ("Code", "AssumeRoleUnauthorizedAccess"),
                        ("Message", &message),
                        ("LastUpdated", &document::imds_time(OffsetDateTime::now_utc())),
                    ]),
                )
            }
            Failure::Unavailable | Failure::Unsynced | Failure::Contested | Failure::Upstream(_) => {
                error_page(StatusCode::SERVICE_UNAVAILABLE, "503 - Service Unavailable")
            }
        }
    }
}

/// The AWS (or Kubernetes) error code behind a refusal, never anything secret.
fn refusal_code(error: &credentials::Error) -> String {
    match error {
        credentials::Error::Sts(e) => e.code().to_owned(),
        credentials::Error::SaToken(crate::sa_token::Error::Refused { status, reason, .. }) => {
            format!("TokenRequest {status} {reason}")
        }
        other => other.kind().to_owned(),
    }
}

/// A metadata answer: text verbatim, JSON in EC2's layout.
pub fn metadata(answer: crate::metadata::Answer) -> Response<Body> {
    match answer {
        crate::metadata::Answer::Text(body) => text(StatusCode::OK, body),
        crate::metadata::Answer::Json(fields) => {
            let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
            text(StatusCode::OK, document::json(&fields))
        }
    }
}

/// A `text/plain` document.
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    decorate(&mut response);
    response
}

/// The token response: the token, with its TTL echoed (Go and Rust SDKs cannot use a token without it).
pub fn token(token: String, ttl_seconds: u64) -> Response<Body> {
    let mut response = text(StatusCode::OK, token);
    response
        .headers_mut()
        .insert("x-aws-ec2-metadata-token-ttl-seconds", HeaderValue::from(ttl_seconds));
    response
}

fn empty(status: StatusCode) -> Response<Body> {
    text(status, String::new())
}

fn error_page(status: StatusCode, title: &str) -> Response<Body> {
    text(
        status,
        format!(
            "<?xml version=\"1.0\" encoding=\"iso-8859-1\"?>\n\
             <!DOCTYPE html PUBLIC \"-//W3C//DTD XHTML 1.0 Transitional//EN\"\n\
             \t\"http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd\">\n\
             <html xmlns=\"http://www.w3.org/1999/xhtml\" xml:lang=\"en\" lang=\"en\">\n \
             <head>\n  <title>{title}</title>\n </head>\n \
             <body>\n  <h1>{title}</h1>\n </body>\n\
             </html>\n"
        ),
    )
}

fn decorate(response: &mut Response<Body>) {
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    headers.insert(header::SERVER, HeaderValue::from_static("EC2ws"));
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("none"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_response_carries_ec2s_headers() {
        for response in [
            Failure::NotFound.into_response(),
            Failure::Forwarded.into_response(),
            token("t".into(), 5),
        ] {
            assert_eq!(response.headers()[header::SERVER], "EC2ws");
            assert_eq!(response.headers()[header::CONTENT_TYPE], "text/plain");
        }
    }

    #[test]
    fn failures_map_to_ec2_statuses() {
        let cases = [
            (Failure::BadPath, 400),
            (Failure::TargetTooLong, 414),
            (Failure::HeadersTooLarge, 431),
            (Failure::BadTtl, 400),
            (Failure::Forwarded, 403),
            (Failure::VersionedTokenPath, 403),
            (Failure::MethodNotAllowed("OPTIONS, PUT"), 405),
            (Failure::BadToken, 401),
            (Failure::TokenRequired, 401),
            (Failure::NotFound, 404),
            (Failure::InvalidRole, 404),
            (Failure::Unavailable, 503),
            (Failure::Unsynced, 503),
            (Failure::Contested, 503),
            (
                Failure::Upstream(crate::metadata::UpstreamError::Status(StatusCode::BAD_GATEWAY)),
                503,
            ),
        ];
        for (failure, status) in cases {
            let kind = failure.kind();
            assert_eq!(failure.into_response().status().as_u16(), status, "{kind}");
        }
    }

    #[test]
    fn a_refusal_is_a_non_success_document_without_secrets() {
        let role = RoleArn::parse("arn:aws:iam::123456789012:role/app").unwrap();
        let error = credentials::Error::Sts(crate::sts::Error::Refused {
            role: role.to_string(),
            code: "AccessDenied".into(),
            message: "Not authorized to perform sts:AssumeRoleWithWebIdentity".into(),
        });
        let response = Failure::Refused { role, error }.into_response();
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.into_body();
        let bytes = futures::executor::block_on(http_body_util::BodyExt::collect(body))
            .unwrap()
            .to_bytes();
        let doc: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(doc["Code"], "AssumeRoleUnauthorizedAccess");
        assert!(doc["Message"].as_str().unwrap().contains("AccessDenied"));
        assert!(doc.get("AccessKeyId").is_none());
    }
}
