//! Bounded refusal logging: a flood of bad requests (invalid IMDSv2 tokens, unknown addresses, hostile
//! paths) writes a bounded number of log lines, the rest only counted. Each refusal kind may write
//! [`BURST`] lines at once and [`PER_MINUTE`] a minute after that; what is held back is counted in
//! `imds_broker_imds_refusal_logs_suppressed_total{kind}` and reported by the next line that passes.
//!
//! Kinds are the closed labels of `response::Failure::kind`, so the map stays small whatever the input.

use std::collections::HashMap;
use std::sync::Mutex;

use prometheus::{IntCounterVec, Opts, Registry};
use tokio::time::Instant;

/// Lines a kind may write at once.
pub const BURST: f64 = 20.0;
/// Lines a kind may write a minute, sustained.
pub const PER_MINUTE: f64 = 60.0;

struct Bucket {
    tokens: f64,
    refilled: Instant,
    held_back: u64,
}

/// The per-kind budget.
pub struct Limiter {
    buckets: Mutex<HashMap<&'static str, Bucket>>,
    suppressed: IntCounterVec,
}

impl Limiter {
    /// Creates the limiter and registers its metric.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let suppressed = IntCounterVec::new(
            Opts::new(
                "imds_broker_imds_refusal_logs_suppressed_total",
                "Refusal log lines held back by the per-kind budget (the refusals themselves are all counted in imds_broker_imds_requests_total)",
            ),
            &["kind"],
        )?;
        registry.register(Box::new(suppressed.clone()))?;
        Ok(Self {
            buckets: Mutex::default(),
            suppressed,
        })
    }

    /// Whether a line of `kind` may be written now: `Some(n)` with the number held back since the last
    /// line of that kind, or `None` (counted) when the budget is spent.
    pub fn admit(&self, kind: &'static str) -> Option<u64> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().expect("refusal log lock poisoned");
        let bucket = buckets.entry(kind).or_insert(Bucket {
            tokens: BURST,
            refilled: now,
            held_back: 0,
        });
        let elapsed = now.duration_since(bucket.refilled).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * PER_MINUTE / 60.0).min(BURST);
        bucket.refilled = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Some(std::mem::take(&mut bucket.held_back))
        } else {
            bucket.held_back += 1;
            self.suppressed.with_label_values(&[kind]).inc();
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_flood_writes_a_burst_then_a_line_a_second_and_counts_the_rest() {
        let limiter = Limiter::register(&Registry::new()).unwrap();
        let admitted = (0..1000).filter(|_| limiter.admit("bad_token").is_some()).count();
        assert_eq!(admitted, 20);
        // Another kind has its own budget.
        assert_eq!(limiter.admit("not_found"), Some(0));
        tokio::time::sleep(Duration::from_secs(1)).await;
        // The next line that passes says how many were held back.
        assert_eq!(limiter.admit("bad_token"), Some(980));
        assert_eq!(limiter.admit("bad_token"), None);
        let mut over_a_minute = 0;
        for _ in 0..600 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            over_a_minute += usize::from(limiter.admit("bad_token").is_some());
        }
        assert!(
            (59..=61).contains(&over_a_minute),
            "{over_a_minute} lines in a minute of flood"
        );
        assert_eq!(
            limiter.suppressed.with_label_values(&["bad_token"]).get(),
            980 + 1 + 600 - over_a_minute as u64
        );
    }
}
