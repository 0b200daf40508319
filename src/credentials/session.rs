//! What the cache hands out: one STS session's credentials with their IMDS and container-credentials
//! documents, each rendered once.

use std::sync::OnceLock;

use bytes::Bytes;

use crate::workload::Credentials;

/// One STS session as served: the credentials and their IMDS document, rendered once on first use so
/// a cache hit costs no formatting. Holds secrets: never logged (see `Credentials`' `Debug`).
pub struct StsSession {
    /// The temporary credentials.
    pub credentials: Credentials,
    document: OnceLock<Bytes>,
    container_document: OnceLock<Bytes>,
}

impl StsSession {
    /// A session for `credentials`.
    pub fn new(credentials: Credentials) -> Self {
        Self {
            credentials,
            document: OnceLock::new(),
            container_document: OnceLock::new(),
        }
    }

    /// The IMDS wire form, rendered by `render` the first time and reused afterwards.
    pub fn document(&self, render: impl FnOnce(&Credentials) -> Bytes) -> Bytes {
        self.document.get_or_init(|| render(&self.credentials)).clone()
    }

    /// The container-credentials wire form, likewise (the same session serves both endpoints).
    pub fn container_document(&self, render: impl FnOnce(&Credentials) -> Bytes) -> Bytes {
        self.container_document
            .get_or_init(|| render(&self.credentials))
            .clone()
    }
}

impl std::fmt::Debug for StsSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StsSession")
            .field("credentials", &self.credentials)
            .finish_non_exhaustive()
    }
}
