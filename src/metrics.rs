//! The process-wide Prometheus registry and its text encoding. Components register their own metrics
//! (see each module's `Metrics`); names follow `imds_broker_<subsystem>_<noun>_<unit>` and label values
//! come from closed sets, never pod names or ARNs.

use prometheus::{Encoder, IntGauge, Opts, Registry, TextEncoder};

/// A registry with the build information gauge: the crate's version and the git revision the binary
/// was built from (`build.rs`).
pub fn registry() -> prometheus::Result<Registry> {
    let registry = Registry::new();
    let info = IntGauge::with_opts(
        Opts::new("imds_broker_build_info", "Build information; the value is always 1")
            .const_label("version", env!("CARGO_PKG_VERSION"))
            .const_label("revision", env!("IMDS_BROKER_REVISION")),
    )?;
    info.set(1);
    registry.register(Box::new(info))?;
    Ok(registry)
}

/// Renders every registered metric in the text exposition format.
pub fn encode(registry: &Registry) -> String {
    let mut buffer = Vec::new();
    // Encoding into a Vec cannot fail for well-formed metric families, which registration guarantees.
    if let Err(error) = TextEncoder::new().encode(&registry.gather(), &mut buffer) {
        tracing::error!(%error, "could not encode metrics");
    }
    String::from_utf8(buffer).unwrap_or_default()
}
