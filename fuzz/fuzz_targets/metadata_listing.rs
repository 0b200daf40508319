//! Filtering of listings from the node's IMDS (`metadata::Rules::filter`): the body is whatever the
//! upstream (or anything that answers on its address) sends.
//!
//! Input: `directory LF listing body`. Checks, under the default allow-list and under a permissive
//! `.*`, that filtering never panics and keeps only lines of the body that would be served: no denied
//! path, no leaf the allow-list refuses, nothing a client could resolve differently.

#![no_main]

use std::sync::LazyLock;

use imds_broker::metadata::{Rules, denied};
use libfuzzer_sys::fuzz_target;

static RULES: LazyLock<[Rules; 2]> = LazyLock::new(|| {
    [
        Rules::default_allow(),
        Rules::new(&[".*"]).expect("a permissive pattern compiles"),
    ]
});

fuzz_target!(|data: &[u8]| {
    // The upstream client refuses bodies that are not UTF-8 before any filtering.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (directory, listing) = text.split_once('\n').unwrap_or(("meta-data", text));
    for rules in RULES.iter() {
        let kept = rules.filter(directory, listing);
        let lines: Vec<&str> = listing.lines().collect();
        for entry in &kept {
            assert!(
                lines.contains(&entry.as_str()),
                "{entry:?} is not a line of the listing"
            );
            assert!(!entry.is_empty() && !entry.starts_with('.') && !entry.contains(['\\', '%']));
            let full = format!("{directory}/{}", entry.trim_end_matches('/'));
            assert!(!denied(&full), "{full:?} is denied but listed");
            if !entry.ends_with('/') {
                assert!(rules.allows(&full), "{full:?} is listed but not served");
            }
        }
    }
});
