//! The double's events.k8s.io/v1 Events: `POST /apis/events.k8s.io/v1/namespaces/{ns}/events` and
//! `GET`/`PATCH` (JSON merge patch) of `.../events/{name}`, validated as the real API server validates
//! them (`pkg/apis/core/validation/events.go` for the v1 group), and every write recorded for tests.
//!
//! - Unknown fields are refused with 400, as `fieldValidation=Strict` would (the real server's default,
//!   `Warn`, drops them silently: stricter here so a misspelt field fails a test instead of vanishing).
//! - Create: `eventTime`, `reportingController` (a qualified name), `reportingInstance`, `action`,
//!   `reason` (each at most 128 characters) are required, `note` is at most 1024 bytes, `type` is
//!   `Normal` or `Warning`, the `deprecated*` fields are unset, `series` (if any) has `count` ≥ 2 and a
//!   `lastObservedTime`, and `regarding` names an object in the Event's namespace (the server refuses
//!   an empty `regarding.namespace` outside `default`/`kube-system`; a pod's is never empty).
//! - Patch: the same rules on the result, `series` rules when it changed, and `action`, `reason`,
//!   `note`, `type`, `eventTime`, `regarding`, `related`, `reportingController`, `reportingInstance`
//!   immutable. A patch of a missing Event is 404, a create of an existing name 409.
//!
//! Not modelled: strategic-merge and JSON patches (the content type is not checked), the Event TTL.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Value, json};

use super::{ApiError, merge_patch, meta_str};

/// One write the double received for an Event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EventWrite {
    /// `POST` or `PATCH`.
    pub verb: &'static str,
    /// The namespace in the path.
    pub namespace: String,
    /// The Event's name (from the body for a create).
    pub name: String,
    /// The HTTP status the double answered with.
    pub status: u16,
}

/// The stored Events and the writes.
#[derive(Default)]
pub(super) struct Store {
    events: BTreeMap<(String, String), Value>,
    writes: Vec<EventWrite>,
    next_uid: u64,
    resource_version: u64,
    failure: Option<u16>,
}

impl Store {
    /// Every stored Event, by namespace and name.
    pub(super) fn events(&self) -> Vec<Value> {
        self.events.values().cloned().collect()
    }

    /// Every write, in order.
    pub(super) fn writes(&self) -> Vec<EventWrite> {
        self.writes.clone()
    }

    /// Answer every write with `status` (403 as without RBAC, 503, …), or `None` to answer normally.
    pub(super) fn set_failure(&mut self, status: Option<u16>) {
        self.failure = status;
    }

    /// `POST .../namespaces/{ns}/events`.
    pub(super) fn create(&mut self, ns: &str, body: &[u8]) -> Result<Value, ApiError> {
        let name_hint = serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| meta_str(&v, "name").map(str::to_owned))
            .unwrap_or_default();
        let result = match self.failure {
            Some(status) => Err(ApiError::for_status(status)),
            None => self.try_create(ns, body),
        };
        self.record("POST", ns, &name_hint, &result);
        result
    }

    /// `PATCH .../namespaces/{ns}/events/{name}` (a JSON merge patch).
    pub(super) fn patch(&mut self, ns: &str, name: &str, body: &[u8]) -> Result<Value, ApiError> {
        let result = match self.failure {
            Some(status) => Err(ApiError::for_status(status)),
            None => self.try_patch(ns, name, body),
        };
        self.record("PATCH", ns, name, &result);
        result
    }

    /// `GET .../namespaces/{ns}/events/{name}`.
    pub(super) fn get(&self, ns: &str, name: &str) -> Result<Value, ApiError> {
        self.events
            .get(&(ns.to_owned(), name.to_owned()))
            .cloned()
            .ok_or_else(|| not_found(name))
    }

    fn record(&mut self, verb: &'static str, ns: &str, name: &str, result: &Result<Value, ApiError>) {
        self.writes.push(EventWrite {
            verb,
            namespace: ns.to_owned(),
            name: name.to_owned(),
            status: result
                .as_ref()
                .map_or_else(|e| e.code, |_| if verb == "POST" { 201 } else { 200 }),
        });
    }

    fn try_create(&mut self, ns: &str, body: &[u8]) -> Result<Value, ApiError> {
        let mut event = parse(body)?;
        strict(&event, "", EVENT_FIELDS)?;
        match meta_str(&event, "namespace") {
            Some(other) if !other.is_empty() && other != ns => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            _ => {}
        }
        let name = meta_str(&event, "name").unwrap_or_default().to_owned();
        let mut errors = validate(&event, ns, &name);
        errors.extend(validate_series(&event));
        if !errors.is_empty() {
            return Err(invalid(&name, &errors));
        }
        let key = (ns.to_owned(), name.clone());
        if self.events.contains_key(&key) {
            return Err(ApiError {
                details: Some(json!({ "name": name, "group": "events.k8s.io", "kind": "events" })),
                ..ApiError::new(
                    409,
                    "AlreadyExists",
                    format!("events.events.k8s.io \"{name}\" already exists"),
                )
            });
        }
        self.next_uid += 1;
        self.resource_version += 1;
        event["apiVersion"] = json!("events.k8s.io/v1");
        event["kind"] = json!("Event");
        let meta = &mut event["metadata"];
        meta["namespace"] = json!(ns);
        meta["uid"] = json!(format!("event-uid-{}", self.next_uid));
        meta["resourceVersion"] = json!(self.resource_version.to_string());
        meta["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
        self.events.insert(key, event.clone());
        Ok(event)
    }

    fn try_patch(&mut self, ns: &str, name: &str, body: &[u8]) -> Result<Value, ApiError> {
        let patch = parse(body)?;
        strict(&patch, "", EVENT_FIELDS)?;
        let key = (ns.to_owned(), name.to_owned());
        let old = self.events.get(&key).ok_or_else(|| not_found(name))?;
        let mut new = old.clone();
        merge_patch(&mut new, &patch);
        let mut errors = validate(&new, ns, name);
        if new.get("series") != old.get("series") {
            errors.extend(validate_series(&new));
        }
        for field in IMMUTABLE {
            if new.get(field) != old.get(field) {
                errors.push(format!("{field}: Invalid value: field is immutable"));
            }
        }
        if meta_str(&new, "name") != Some(name) || meta_str(&new, "namespace") != Some(ns) {
            errors.push("metadata: Invalid value: name and namespace are immutable".to_owned());
        }
        if !errors.is_empty() {
            return Err(invalid(name, &errors));
        }
        self.resource_version += 1;
        new["metadata"]["resourceVersion"] = json!(self.resource_version.to_string());
        self.events.insert(key, new.clone());
        Ok(new)
    }
}

/// The fields of events.k8s.io/v1 Event, and of the objects inside it that are checked strictly.
const EVENT_FIELDS: &[&str] = &[
    "apiVersion",
    "kind",
    "metadata",
    "eventTime",
    "series",
    "reportingController",
    "reportingInstance",
    "action",
    "reason",
    "regarding",
    "related",
    "note",
    "type",
    "deprecatedSource",
    "deprecatedFirstTimestamp",
    "deprecatedLastTimestamp",
    "deprecatedCount",
];
const META_FIELDS: &[&str] = &[
    "name",
    "generateName",
    "namespace",
    "selfLink",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "managedFields",
];
const SERIES_FIELDS: &[&str] = &["count", "lastObservedTime"];
const REFERENCE_FIELDS: &[&str] = &[
    "apiVersion",
    "kind",
    "namespace",
    "name",
    "uid",
    "resourceVersion",
    "fieldPath",
];
const SOURCE_FIELDS: &[&str] = &["component", "host"];
const IMMUTABLE: &[&str] = &[
    "action",
    "reason",
    "note",
    "type",
    "eventTime",
    "regarding",
    "related",
    "reportingController",
    "reportingInstance",
    "deprecatedSource",
    "deprecatedFirstTimestamp",
    "deprecatedLastTimestamp",
    "deprecatedCount",
];

fn parse(body: &[u8]) -> Result<Value, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body of the request was in an unknown format: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::bad_request("the body of the request must be a JSON object"));
    }
    Ok(value)
}

/// Refuses a field the schema does not have, at the top level and in the nested objects above.
fn strict(object: &Value, prefix: &str, known: &[&str]) -> Result<(), ApiError> {
    let Some(map) = object.as_object() else {
        return Ok(());
    };
    for (field, value) in map {
        let path = format!("{prefix}{field}");
        if !known.contains(&field.as_str()) {
            return Err(ApiError::bad_request(format!(
                "strict decoding error: unknown field \"{path}\""
            )));
        }
        let nested = match (prefix, field.as_str()) {
            ("", "metadata") => META_FIELDS,
            ("", "series") => SERIES_FIELDS,
            ("", "regarding" | "related") => REFERENCE_FIELDS,
            ("", "deprecatedSource") => SOURCE_FIELDS,
            _ => continue,
        };
        strict(value, &format!("{path}."), nested)?;
    }
    Ok(())
}

fn text<'a>(event: &'a Value, field: &str) -> &'a str {
    event.get(field).and_then(Value::as_str).unwrap_or_default()
}

/// The create rules that hold for every stored Event.
fn validate(event: &Value, ns: &str, name: &str) -> Vec<String> {
    let mut errors = Vec::new();
    if name.is_empty() {
        errors.push("metadata.name: Required value: name or generateName is required".to_owned());
    } else if !is_dns_subdomain(name) {
        errors.push(format!(
            "metadata.name: Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'"
        ));
    }
    match event.get("eventTime").and_then(Value::as_str) {
        None | Some("") => errors.push("eventTime: Required value".to_owned()),
        Some(time) if !is_micro_time(time) => errors.push(format!("eventTime: Invalid value: {time:?}")),
        Some(_) => {}
    }
    let controller = text(event, "reportingController");
    if controller.is_empty() {
        errors.push("reportingController: Required value".to_owned());
    } else if !is_qualified_name(controller) {
        errors.push(format!(
            "reportingController: Invalid value: {controller:?}: must be a qualified name"
        ));
    }
    for (field, limit) in [("reportingInstance", 128), ("action", 128), ("reason", 128)] {
        let value = text(event, field);
        if value.is_empty() {
            errors.push(format!("{field}: Required value"));
        } else if value.len() > limit {
            errors.push(format!("{field}: Invalid value: can have at most {limit} characters"));
        }
    }
    if text(event, "note").len() > 1024 {
        errors.push("note: Invalid value: can have at most 1024 characters".to_owned());
    }
    let kind = text(event, "type");
    if kind != "Normal" && kind != "Warning" {
        errors.push(format!("type: Invalid value: {kind:?}: has invalid value"));
    }
    for field in [
        "deprecatedSource",
        "deprecatedFirstTimestamp",
        "deprecatedLastTimestamp",
        "deprecatedCount",
    ] {
        if event.get(field).is_some_and(|v| !v.is_null()) {
            errors.push(format!("{field}: Invalid value: needs to be unset"));
        }
    }
    match event.get("regarding") {
        Some(regarding) if regarding.is_object() => {
            if text(regarding, "namespace") != ns {
                errors.push("regarding.namespace: Invalid value: does not match event.namespace".to_owned());
            }
            for field in ["kind", "name"] {
                if text(regarding, field).is_empty() {
                    errors.push(format!("regarding.{field}: Required value"));
                }
            }
        }
        _ => errors.push("regarding: Required value".to_owned()),
    }
    errors
}

fn validate_series(event: &Value) -> Vec<String> {
    let Some(series) = event.get("series").filter(|s| !s.is_null()) else {
        return Vec::new();
    };
    let mut errors = Vec::new();
    if series.get("count").and_then(Value::as_i64).is_none_or(|c| c < 2) {
        errors.push("series.count: Invalid value: should be at least 2".to_owned());
    }
    match series.get("lastObservedTime").and_then(Value::as_str) {
        Some(time) if is_micro_time(time) => {}
        _ => errors.push("series.lastObservedTime: Required value".to_owned()),
    }
    errors
}

fn invalid(name: &str, errors: &[String]) -> ApiError {
    ApiError {
        details: Some(json!({ "name": name, "group": "events.k8s.io", "kind": "Event" })),
        ..ApiError::new(
            422,
            "Invalid",
            format!("Event.events.k8s.io \"{name}\" is invalid: [{}]", errors.join(", ")),
        )
    }
}

fn not_found(name: &str) -> ApiError {
    ApiError {
        details: Some(json!({ "name": name, "group": "events.k8s.io", "kind": "events" })),
        ..ApiError::new(404, "NotFound", format!("events.events.k8s.io \"{name}\" not found"))
    }
}

/// An RFC 3339 time, as the server parses a metav1.MicroTime (clients send `…05.000000Z`).
fn is_micro_time(value: &str) -> bool {
    time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc3339).is_ok()
}

fn is_dns_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 63
        && label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-')
}

fn is_dns_subdomain(value: &str) -> bool {
    value.len() <= 253 && value.split('.').all(is_dns_label)
}

/// `[prefix/]name`: an optional DNS subdomain prefix, and a name of at most 63 alphanumerics, `-`,
/// `_` or `.`, starting and ending alphanumeric.
fn is_qualified_name(value: &str) -> bool {
    let (prefix, name) = match value.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, value),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && name.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && name.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric());
    name_ok && prefix.is_none_or(is_dns_subdomain)
}
