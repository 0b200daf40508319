//! Request-target routing (`server::route`) under arbitrary methods and targets.
//!
//! Input: `METHOD SP target` (no space: the whole input is a `GET` target), the way a request line
//! reaches the router. Checks that routing never panics and that whatever is routed is exactly its
//! canonical path, with at most the one tolerated trailing slash (and the one tolerated doubled leading
//! slash): nothing is decoded, resolved or
//! normalised on the way to a handler.

#![no_main]

use http::Method;
use imds_broker::server::route::{Route, route, route_target};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (method, target) = match data.iter().position(|b| *b == b' ') {
        Some(i) => match Method::from_bytes(&data[..i]) {
            Ok(method) => (method, &data[i + 1..]),
            Err(_) => return,
        },
        None => (Method::GET, data),
    };
    // A request line that is not UTF-8 never reaches the router: hyper refuses it first.
    let Ok(target) = std::str::from_utf8(target) else {
        return;
    };
    if let Ok(routed) = route(&method, target) {
        check(&routed, target);
    }
    if let Ok(uri) = target.parse::<http::Uri>()
        && let Ok(routed) = route_target(&method, &uri)
    {
        assert!(uri.scheme().is_none() && uri.authority().is_none() && uri.query().is_none());
        check(&routed, uri.path());
    }
});

fn check(routed: &Route, path: &str) {
    // The one doubled leading slash read as one (the JS v3 MetadataService's).
    let path = path.strip_prefix('/').filter(|p| p.starts_with('/')).unwrap_or(path);
    let canonical = routed.path();
    assert!(
        path == canonical || path.strip_suffix('/') == Some(canonical.as_str()),
        "{path:?} routed as {canonical:?}"
    );
    assert!(path.bytes().all(|b| b.is_ascii_graphic() && b != b'%' && b != b'\\'));
    assert!(!path.split('/').any(|s| s == "." || s == ".."));
    let _ = routed.label();
}
