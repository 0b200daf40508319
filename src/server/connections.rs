//! How many connections the endpoint holds: at most `total` open at once and `per_ip` from one source
//! address, so one pod (or a flood from anywhere) cannot exhaust the agent's file descriptors or
//! memory. A connection over a limit is closed as soon as it is accepted, before anything is read.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use prometheus::{IntCounterVec, IntGauge, Opts, Registry};

/// The limits of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// `--max-connections`.
    pub total: usize,
    /// `--max-connections-per-ip`.
    pub per_ip: usize,
}

/// Connection metrics.
#[derive(Clone)]
pub struct Metrics {
    open: IntGauge,
    refused: IntCounterVec,
}

impl Metrics {
    /// Creates and registers the metrics.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let open = IntGauge::new("imds_broker_imds_connections_open", "IMDS connections open")?;
        let refused = IntCounterVec::new(
            Opts::new(
                "imds_broker_imds_connections_refused_total",
                "IMDS connections closed on accept, by limit (total, per_ip)",
            ),
            &["limit"],
        )?;
        for limit in ["total", "per_ip"] {
            refused.with_label_values(&[limit]);
        }
        registry.register(Box::new(open.clone()))?;
        registry.register(Box::new(refused.clone()))?;
        Ok(Self { open, refused })
    }
}

/// The open connections of one listener, by source address.
#[derive(Clone)]
pub struct Limits {
    config: Config,
    open: Arc<Mutex<(usize, HashMap<IpAddr, usize>)>>,
    metrics: Option<Metrics>,
}

/// One admitted connection; it leaves the count when dropped.
pub struct Slot {
    limits: Limits,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.limits.lock();
        open.0 -= 1;
        if let Some(n) = open.1.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.1.remove(&self.ip);
            }
        }
        if let Some(metrics) = &self.limits.metrics {
            metrics.open.dec();
        }
    }
}

impl Limits {
    /// Limits counted in `metrics` (none for the admin endpoint).
    pub fn new(config: Config, metrics: Option<Metrics>) -> Self {
        Self {
            config,
            open: Arc::default(),
            metrics,
        }
    }

    /// A slot for a connection from `ip`, or `None` (counted) if a limit is reached.
    pub fn admit(&self, ip: IpAddr) -> Option<Slot> {
        let mut open = self.lock();
        let from_ip = open.1.get(&ip).copied().unwrap_or(0);
        let over = if open.0 >= self.config.total {
            Some("total")
        } else if from_ip >= self.config.per_ip {
            Some("per_ip")
        } else {
            None
        };
        if let Some(limit) = over {
            if let Some(metrics) = &self.metrics {
                metrics.refused.with_label_values(&[limit]).inc();
            }
            return None;
        }
        open.0 += 1;
        *open.1.entry(ip).or_default() += 1;
        if let Some(metrics) = &self.metrics {
            metrics.open.inc();
        }
        Some(Slot {
            limits: self.clone(),
            ip,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, HashMap<IpAddr, usize>)> {
        self.open.lock().expect("connection count lock poisoned")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn one_address_cannot_take_more_than_its_share_nor_everyone_more_than_the_total() {
        let limits = Limits::new(Config { total: 5, per_ip: 2 }, None);
        let a1 = limits.admit(ip("10.0.0.1")).unwrap();
        let _a2 = limits.admit(ip("10.0.0.1")).unwrap();
        assert!(limits.admit(ip("10.0.0.1")).is_none());
        let _b = (
            limits.admit(ip("10.0.0.2")).unwrap(),
            limits.admit(ip("10.0.0.2")).unwrap(),
        );
        let _c = limits.admit(ip("10.0.0.3")).unwrap();
        assert!(limits.admit(ip("10.0.0.4")).is_none(), "the total is reached");
        drop(a1);
        assert!(
            limits.admit(ip("10.0.0.1")).is_some(),
            "a closed connection frees its slot"
        );
        assert!(limits.lock().1.len() <= 3);
    }
}
