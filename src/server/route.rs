//! Where an IMDS request goes, decided from its method and target alone, before anything about the
//! caller is known. Targets are taken literally: whatever a normalising proxy or client could read
//! differently is refused here and never reaches a handler. Two spellings are tolerated, both of a
//! real client: one trailing slash (botocore's leaves) and one doubled leading slash before `latest`
//! (the JS v3 SDK's MetadataService).

use http::Method;

use super::response::Failure;

/// Where a request goes, decided from method and path alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `PUT /latest/api/token`: an IMDSv2 token, answered without knowing the caller.
    Token,
    /// The caller's own credential tree, answered from its pod's role.
    Iam(Iam),
    /// Any other `GET` under `/latest/` (outside `meta-data/iam/`), as a path relative to `/latest/`
    /// without a trailing slash (`""` is `/latest/` itself). What is served there is decided by
    /// [`crate::metadata`], never by the router.
    Metadata(String),
}

/// The paths under `meta-data/iam/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Iam {
    /// `GET /latest/meta-data/iam/`.
    Listing,
    /// `GET /latest/meta-data/iam/security-credentials/`.
    RoleListing,
    /// `GET /latest/meta-data/iam/security-credentials/<name>`.
    RoleDocument(String),
    /// `GET /latest/meta-data/iam/info`.
    Info,
}

impl Route {
    /// A closed label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Route::Token => "token",
            Route::Iam(Iam::Listing) => "iam",
            Route::Iam(Iam::RoleListing) => "role_listing",
            Route::Iam(Iam::RoleDocument(_)) => "credentials",
            Route::Iam(Iam::Info) => "info",
            Route::Metadata(_) => "metadata",
        }
    }

    /// The one canonical path this route answers (without the tolerated trailing slash).
    pub fn path(&self) -> String {
        match self {
            Route::Token => "/latest/api/token".to_owned(),
            Route::Iam(Iam::Listing) => "/latest/meta-data/iam".to_owned(),
            Route::Iam(Iam::RoleListing) => "/latest/meta-data/iam/security-credentials".to_owned(),
            Route::Iam(Iam::RoleDocument(name)) => format!("/latest/meta-data/iam/security-credentials/{name}"),
            Route::Iam(Iam::Info) => "/latest/meta-data/iam/info".to_owned(),
            Route::Metadata(path) if path.is_empty() => "/latest".to_owned(),
            Route::Metadata(path) => format!("/latest/{path}"),
        }
    }
}

/// The longest request target routed; longer ones are 414. No metadata path comes close.
pub const MAX_TARGET: usize = 1024;

/// Routes a whole request target. Only the origin form (`/path`) is accepted: an absolute-form target
/// (`GET http://host/path`), an authority or `*` form, and any query string are 400, so nothing but
/// the path can ever influence what is answered (or forwarded upstream).
pub fn route_target(method: &Method, target: &http::Uri) -> Result<Route, Failure> {
    if target.path_and_query().map_or(0, |p| p.as_str().len()) > MAX_TARGET {
        return Err(Failure::TargetTooLong);
    }
    if target.scheme().is_some() || target.authority().is_some() || target.query().is_some() {
        return Err(Failure::BadPath);
    }
    route(method, target.path())
}

/// Routes a request. Paths are taken literally: anything that a normalising proxy or client could
/// read differently (dot segments, percent-encoding, backslashes, empty segments, control bytes) is a
/// 400 and never reaches a handler.
pub fn route(method: &Method, path: &str) -> Result<Route, Failure> {
    if path.len() > MAX_TARGET {
        return Err(Failure::TargetTooLong);
    }
    // The JS v3 SDK's MetadataService joins its endpoint's path ("/") and the documented
    // "/latest/..." into "//latest/...": that one doubled leading slash, and no other, is read as one.
    let path = match path.strip_prefix('/') {
        Some(rest) if rest == "/latest" || rest.starts_with("/latest/") => rest,
        _ => path,
    };
    if !is_clean(path) {
        return Err(Failure::BadPath);
    }
    let segments: Vec<&str> = path[1..].split('/').collect();
    // One trailing slash is tolerated on every path, as IMDS does (botocore asks for leaves with one).
    let segments = match segments.split_last() {
        Some((&"", rest)) => rest,
        _ => &segments[..],
    };
    match segments {
        ["latest", "api", "token"] => {
            return if method == Method::PUT {
                Ok(Route::Token)
            } else {
                Err(Failure::MethodNotAllowed("OPTIONS, PUT"))
            };
        }
        [_, "api", "token"] if method == Method::PUT => return Err(Failure::VersionedTokenPath),
        _ => {}
    }
    let route = match segments {
        ["latest", "meta-data", "iam"] => Route::Iam(Iam::Listing),
        ["latest", "meta-data", "iam", "security-credentials"] => Route::Iam(Iam::RoleListing),
        ["latest", "meta-data", "iam", "security-credentials", name] => {
            Route::Iam(Iam::RoleDocument((*name).to_owned()))
        }
        ["latest", "meta-data", "iam", "info"] => Route::Iam(Iam::Info),
        // The node's own credential tree is never looked up anywhere else.
        ["latest", "meta-data", "iam", ..] => return Err(Failure::NotFound),
        ["latest"] => Route::Metadata(String::new()),
        ["latest", "meta-data" | "dynamic", ..] => Route::Metadata(segments[1..].join("/")),
        _ => return Err(Failure::NotFound),
    };
    if method != Method::GET && method != Method::HEAD {
        return Err(Failure::MethodNotAllowed("GET, HEAD"));
    }
    Ok(route)
}

fn is_clean(path: &str) -> bool {
    path.starts_with('/')
        && path.bytes().all(|b| b.is_ascii_graphic() && b != b'%' && b != b'\\')
        && path[1..]
            .split('/')
            .enumerate()
            .all(|(i, s)| s != "." && s != ".." && (!s.is_empty() || i == path[1..].split('/').count() - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path: &str) -> Result<Route, Failure> {
        route(&Method::GET, path)
    }

    fn kind(r: Result<Route, Failure>) -> &'static str {
        match r {
            Ok(_) => "ok",
            Err(f) => f.kind(),
        }
    }

    #[test]
    fn the_credential_paths_route_with_and_without_a_trailing_slash() {
        let list = Ok::<_, ()>(Route::Iam(Iam::RoleListing));
        assert_eq!(
            get("/latest/meta-data/iam/security-credentials/").ok(),
            list.clone().ok()
        );
        assert_eq!(get("/latest/meta-data/iam/security-credentials").ok(), list.ok());
        assert_eq!(
            get("/latest/meta-data/iam/security-credentials/app").ok(),
            Some(Route::Iam(Iam::RoleDocument("app".into())))
        );
        assert_eq!(
            get("/latest/meta-data/iam/security-credentials/app/").ok(),
            Some(Route::Iam(Iam::RoleDocument("app".into())))
        );
        assert_eq!(get("/latest/meta-data/iam/info").ok(), Some(Route::Iam(Iam::Info)));
        assert_eq!(get("/latest/meta-data/iam/").ok(), Some(Route::Iam(Iam::Listing)));
        assert_eq!(
            route(&Method::HEAD, "/latest/meta-data/iam/info").ok(),
            Some(Route::Iam(Iam::Info))
        );
    }

    #[test]
    fn the_extended_credentials_api_is_not_found_so_sdks_fall_back() {
        assert_eq!(
            kind(get("/latest/meta-data/iam/security-credentials-extended/")),
            "not_found"
        );
        assert_eq!(
            kind(get("/latest/meta-data/iam/security-credentials-extended/app")),
            "not_found"
        );
    }

    #[test]
    fn other_paths_are_not_found() {
        for path in [
            "/",
            "/latest/user-data",
            "/latest/user-data/",
            "/2021-07-15/meta-data/placement/region",
            "/latest/meta-data/iam/security-credentials/a/b",
            "/latest/meta-data/iam/security-credentials-extended/app",
            "/latest/meta-data/iam/anything-else",
        ] {
            assert_eq!(kind(get(path)), "not_found", "{path}");
        }
    }

    #[test]
    fn hostile_paths_are_rejected_before_routing() {
        for path in [
            "/latest/meta-data/iam/security-credentials/../../user-data",
            "/latest/meta-data/iam/security-credentials/%2e%2e/x",
            "/latest/meta-data/iam/security-credentials%2fapp",
            "/latest/meta-data/iam/security-credentials\\app",
            "/latest//meta-data/iam/info",
            "/latest/meta-data/iam/./info",
            "latest/meta-data/iam/info",
        ] {
            assert_eq!(kind(get(path)), "bad_path", "{path}");
        }
        assert_eq!(kind(get(&format!("/latest/{}", "a".repeat(2000)))), "target_too_long");
    }

    fn target(t: &str) -> Result<Route, Failure> {
        route_target(&Method::GET, &t.parse::<http::Uri>().unwrap())
    }

    #[test]
    fn the_metadata_tree_routes_to_the_metadata_source_by_canonical_path() {
        assert_eq!(get("/latest").ok(), Some(Route::Metadata(String::new())));
        assert_eq!(get("/latest/").ok(), Some(Route::Metadata(String::new())));
        assert_eq!(
            get("/latest/meta-data/").ok(),
            Some(Route::Metadata("meta-data".into()))
        );
        assert_eq!(
            get("/latest/meta-data/placement/availability-zone/").ok(),
            Some(Route::Metadata("meta-data/placement/availability-zone".into()))
        );
        assert_eq!(
            get("/latest/dynamic/instance-identity/document").ok(),
            Some(Route::Metadata("dynamic/instance-identity/document".into()))
        );
        assert_eq!(
            kind(route(&Method::POST, "/latest/meta-data/placement/region")),
            "method_not_allowed"
        );
    }

    #[test]
    fn the_doubled_leading_slash_of_the_js_v3_metadata_service_is_read_as_one() {
        assert_eq!(get("//latest/meta-data/iam/info").ok(), Some(Route::Iam(Iam::Info)));
        assert_eq!(
            get("//latest/meta-data/placement/region").ok(),
            Some(Route::Metadata("meta-data/placement/region".into()))
        );
        assert_eq!(route(&Method::PUT, "//latest/api/token").ok(), Some(Route::Token));
        assert_eq!(
            target("//latest/meta-data/").ok(),
            Some(Route::Metadata("meta-data".into()))
        );
    }

    #[test]
    fn only_origin_form_targets_without_a_query_are_routed() {
        assert_eq!(target("/latest/meta-data/iam/info").ok(), Some(Route::Iam(Iam::Info)));
        for bad in [
            "http://169.254.169.254/latest/meta-data/iam/info",
            "http://evil/latest/meta-data/iam/info",
            "169.254.169.254:80",
            "*",
            "/latest/meta-data/iam/info?x=1",
            "/latest/meta-data/iam/info?",
            "/latest/meta-data/placement/region?../../user-data",
        ] {
            assert_eq!(kind(target(bad)), "bad_path", "{bad}");
        }
    }

    #[test]
    fn control_bytes_spaces_and_non_ascii_are_rejected() {
        for path in [
            "/latest/meta-data/iam/info\0",
            "/latest/meta-data/iam/info\0/x",
            "/latest/meta-data/iam/\tinfo",
            "/latest/meta-data/iam/info\r\n",
            "/latest/meta-data/iam/ info",
            "/latest/meta-data/iam/inf\u{7f}o",
            "/latest/meta-data/iam/\u{e9}",
            "/latest/meta-data/placement/region/..",
            "/latest/meta-data/placement/%2E%2E/%2e%2e/user-data",
            "/latest/dynamic/..\\..\\user-data",
            "///latest/meta-data/iam/info",
            "//latest//meta-data/iam/info",
            "//latest/../latest/meta-data/iam/info",
            "//other/latest/meta-data/iam/info",
            "/latest/meta-data//",
        ] {
            assert_eq!(kind(get(path)), "bad_path", "{path:?}");
        }
    }

    use proptest::strategy::Strategy;

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(4096))]

        /// Whatever the target, a routed request answers exactly its one canonical path (optionally
        /// with the one tolerated trailing slash): nothing is resolved, decoded or normalised.
        #[test]
        fn a_routed_target_is_exactly_its_canonical_path(
            parts in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::sample::select(vec![
                        "latest", "meta-data", "iam", "security-credentials", "info", "api", "token",
                        "dynamic", "instance-identity", "document", "placement", "region", "user-data",
                        "..", ".", "", "%2e", "%2f", "%2E%2E", "\\", "\0", "\t", "\u{e9}", "?", "#",
                        " ", ";", "http:", "a\\b", "..;",
                    ]).prop_map(str::to_owned),
                    "[ -~]{0,6}",
                    proptest::prelude::any::<String>(),
                ],
                0..8,
            ),
            leading in proptest::sample::select(vec!["/", "", "//", "\\", "http://x/"]),
            trailing in proptest::sample::select(vec!["", "/", "//"]),
        ) {
            let path = format!("{leading}{}{trailing}", parts.join("/"));
            if let Ok(route) = get(&path) {
                // The one doubled leading slash read as one (the JS v3 MetadataService's).
                let path = path.strip_prefix('/').filter(|p| p.starts_with('/')).unwrap_or(&path);
                let canonical = route.path();
                let with_slash = canonical.clone() + "/";
                proptest::prop_assert!(
                    path == canonical || path == with_slash,
                    "{:?} routed as {:?}", path, canonical
                );
                proptest::prop_assert!(path.bytes().all(|b| b.is_ascii_graphic() && b != b'%' && b != b'\\'));
                proptest::prop_assert!(!path.split('/').any(|s| s == ".." || s == "."));
            }
            if let Ok(uri) = path.parse::<http::Uri>()
                && let Ok(route) = route_target(&Method::GET, &uri)
            {
                proptest::prop_assert!(uri.query().is_none() && uri.authority().is_none());
                let got = uri.path();
                let got = got.strip_prefix('/').filter(|p| p.starts_with('/')).unwrap_or(got);
                let canonical = route.path();
                proptest::prop_assert!(got == canonical || got.strip_suffix('/') == Some(canonical.as_str()));
            }
        }
    }

    #[test]
    fn the_token_path_takes_only_put() {
        assert_eq!(route(&Method::PUT, "/latest/api/token").ok(), Some(Route::Token));
        assert_eq!(kind(route(&Method::GET, "/latest/api/token")), "method_not_allowed");
        assert_eq!(kind(route(&Method::POST, "/latest/api/token")), "method_not_allowed");
        assert_eq!(
            kind(route(&Method::PUT, "/2021-03-23/api/token")),
            "versioned_token_path"
        );
    }

    #[test]
    fn metadata_paths_take_only_get_and_head() {
        assert_eq!(
            kind(route(&Method::POST, "/latest/meta-data/iam/security-credentials/")),
            "method_not_allowed"
        );
        assert_eq!(
            kind(route(&Method::PUT, "/latest/meta-data/iam/info")),
            "method_not_allowed"
        );
    }
}
