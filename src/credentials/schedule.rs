//! Timing policies of the cache as pure functions of durations (and of a random fraction where there is
//! jitter): when a session is refreshed, how long it is served normally and through trouble, and how
//! long a failure is remembered. The cache only calls these; the tests below sweep their inputs.

use std::time::Duration;

/// The life of one STS session, counted from when it was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// When the background refresher replaces it (jittered, see [`refresh_after`]).
    pub refresh_after: Duration,
    /// Until when it is served normally: `min_remaining` before its expiry, when SDKs start refreshing.
    pub fresh_for: Duration,
    /// Until when it is still served while refreshes fail: `expiry_margin` before its expiry.
    pub usable_for: Duration,
}

/// The latest refresh happens this long before the fresh window closes, so failed refreshes have time
/// to be retried before any request must wait for STS.
const REFRESH_LEAD: Duration = Duration::from_secs(600);

/// Decides the life of a session valid for `lifetime` from now, with `fraction` (uniform in `[0, 1)`)
/// spreading refreshes: `None` when it cannot be served at all (no more than `min_remaining` left).
///
/// The refresh falls in the second quarter-to-half of the fresh window (at most [`REFRESH_LEAD`] before
/// it closes), placed by `fraction` within the last fifth of that span, so sessions obtained together
/// (a node's pods after a restart) never refresh together.
pub fn schedule(
    lifetime: Duration,
    min_remaining: Duration,
    expiry_margin: Duration,
    fraction: f64,
) -> Option<Schedule> {
    let fresh_for = lifetime.checked_sub(min_remaining).filter(|d| !d.is_zero())?;
    let usable_for = lifetime.saturating_sub(expiry_margin).max(fresh_for);
    let latest = fresh_for - (fresh_for / 2).min(REFRESH_LEAD);
    let spread = latest / 5;
    Some(Schedule {
        refresh_after: latest - spread.mul_f64(fraction.clamp(0.0, 1.0)),
        fresh_for,
        usable_for,
    })
}

/// The first retry delay after a failure.
pub const BACKOFF_INITIAL: Duration = Duration::from_secs(1);
/// The longest delay between two attempts for one (pod, role).
pub const BACKOFF_CAP: Duration = Duration::from_secs(60);

/// How long to wait before attempt `failures + 1` after `failures` failures in a row (≥ 1): 1 s doubling
/// to [`BACKOFF_CAP`], each delay jittered down by up to a half by `fraction` (uniform in `[0, 1)`) so
/// pods that failed together do not retry together.
pub fn backoff(failures: u32, fraction: f64) -> Duration {
    let exponent = failures.saturating_sub(1).min(16);
    let full = BACKOFF_INITIAL.saturating_mul(1 << exponent).min(BACKOFF_CAP);
    full - (full / 2).mul_f64(fraction.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(15 * 60);
    const MARGIN: Duration = Duration::from_secs(5 * 60);
    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn an_hour_long_session_is_fresh_45_minutes_usable_55_and_refreshed_between_28_and_35() {
        let late = schedule(HOUR, MIN, MARGIN, 0.0).unwrap();
        assert_eq!(late.fresh_for, Duration::from_secs(45 * 60));
        assert_eq!(late.usable_for, Duration::from_secs(55 * 60));
        assert_eq!(late.refresh_after, Duration::from_secs(35 * 60));
        let early = schedule(HOUR, MIN, MARGIN, 0.999_999).unwrap();
        assert_eq!(early.refresh_after.as_secs(), 28 * 60);
    }

    #[test]
    fn a_short_session_is_refreshed_within_the_first_half_of_its_window() {
        let plan = schedule(Duration::from_secs(20 * 60), MIN, MARGIN, 0.0).unwrap();
        assert_eq!(plan.fresh_for, Duration::from_secs(5 * 60));
        assert_eq!(plan.refresh_after, Duration::from_secs(150));
    }

    #[test]
    fn a_session_without_the_minimum_left_is_never_served() {
        assert_eq!(schedule(MIN, MIN, MARGIN, 0.5), None);
        assert_eq!(schedule(Duration::from_secs(60), MIN, MARGIN, 0.5), None);
        assert_eq!(schedule(Duration::ZERO, MIN, MARGIN, 0.5), None);
    }

    #[test]
    fn every_schedule_refreshes_before_the_fresh_window_closes_and_stays_usable_longer() {
        for secs in (MIN.as_secs() + 1..=43_200).step_by(97) {
            for fraction in [0.0, 0.3, 0.999] {
                let lifetime = Duration::from_secs(secs);
                let plan = schedule(lifetime, MIN, MARGIN, fraction).unwrap();
                assert_eq!(lifetime - plan.fresh_for, MIN);
                assert_eq!(lifetime - plan.usable_for, MARGIN);
                assert!(plan.refresh_after < plan.fresh_for);
                assert!(plan.fresh_for - plan.refresh_after >= (plan.fresh_for / 2).min(REFRESH_LEAD));
            }
        }
    }

    #[test]
    fn sessions_obtained_together_refresh_spread_over_minutes() {
        // 1,000 pods that got one-hour sessions at the same instant: their refreshes fall in a
        // seven-minute window, never more than a few in the same second.
        let mut per_second = std::collections::HashMap::<u64, u32>::new();
        for i in 0..1000 {
            let fraction = f64::from(i) / 1000.0;
            let plan = schedule(HOUR, MIN, MARGIN, fraction).unwrap();
            *per_second.entry(plan.refresh_after.as_secs()).or_default() += 1;
        }
        assert!(per_second.len() >= 400, "only {} distinct seconds", per_second.len());
        assert!(per_second.values().all(|n| *n <= 3));
    }

    #[test]
    fn backoff_doubles_from_a_second_to_a_minute_and_jitters_down_by_at_most_half() {
        assert_eq!(backoff(1, 0.0), Duration::from_secs(1));
        assert_eq!(backoff(2, 0.0), Duration::from_secs(2));
        assert_eq!(backoff(6, 0.0), Duration::from_secs(32));
        assert_eq!(backoff(7, 0.0), BACKOFF_CAP);
        assert_eq!(backoff(u32::MAX, 0.0), BACKOFF_CAP);
        for failures in 1..40 {
            for fraction in [0.0, 0.25, 0.5, 0.999] {
                let delay = backoff(failures, fraction);
                let full = backoff(failures, 0.0);
                assert!(delay <= full && delay >= full / 2, "{failures} {fraction}: {delay:?}");
            }
        }
    }

    #[test]
    fn a_refused_role_polled_for_an_hour_costs_at_most_about_one_exchange_a_minute() {
        // Whatever the SDK does, attempts are only made when the backoff has run out.
        let (mut at, mut attempts, mut failures) = (Duration::ZERO, 0, 0);
        while at < HOUR {
            attempts += 1;
            failures += 1;
            at += backoff(failures, 0.999);
        }
        assert!(attempts <= 2 * 60 + 7, "{attempts} exchanges in an hour");
    }
}
