//! Backoff between tries and the retry budget that keeps retries from multiplying an
//! outage.

use std::sync::Mutex;
use std::time::Duration;

use crds::policy::{Backoff, RetryPolicy};
use tokio::time::Instant;

/// The wait before try number `retry` (1 = the first retry): `initial × multiplier^(retry-1)`,
/// capped at `max`, spread by ±`jitter`. `unit` is a uniform sample in [0, 1); tests pass
/// 0.5 for no spread.
pub fn backoff_delay(backoff: &Backoff, retry: u32, unit: f64) -> Duration {
    let exp = i32::try_from(retry.saturating_sub(1)).unwrap_or(i32::MAX);
    let base = backoff.initial.get().as_secs_f64() * backoff.multiplier.max(1.0).powi(exp);
    let capped = base.min(backoff.max.get().as_secs_f64());
    let spread = 1.0 + backoff.jitter.clamp(0.0, 1.0) * (2.0 * unit - 1.0);
    Duration::from_secs_f64((capped * spread).max(0.0))
}

/// Length of the window the budget counts over.
const BUDGET_WINDOW: Duration = Duration::from_secs(10);

/// Retries a route may make per window regardless of traffic (ten a second, as Finagle's
/// budget allows), so failover keeps working on a quiet route while a large outage still
/// cannot multiply load by more than the ratio.
const BUDGET_FLOOR: f64 = 100.0;

/// Retries allowed as a share of requests over the last ten seconds (two five-second
/// halves, so the window slides without storing every request).
#[derive(Debug)]
pub struct RetryBudget {
    inner: Mutex<BudgetWindow>,
}

#[derive(Debug)]
struct BudgetWindow {
    half_start: Instant,
    requests: [f64; 2],
    retries: [f64; 2],
}

impl RetryBudget {
    /// An empty budget.
    pub fn new(now: Instant) -> Self {
        Self {
            inner: Mutex::new(BudgetWindow {
                half_start: now,
                requests: [0.0; 2],
                retries: [0.0; 2],
            }),
        }
    }

    fn roll(w: &mut BudgetWindow, now: Instant) {
        let half = BUDGET_WINDOW / 2;
        let elapsed = now.duration_since(w.half_start);
        if elapsed >= BUDGET_WINDOW {
            *w = BudgetWindow {
                half_start: now,
                requests: [0.0; 2],
                retries: [0.0; 2],
            };
        } else if elapsed >= half {
            w.requests = [w.requests[1], 0.0];
            w.retries = [w.retries[1], 0.0];
            w.half_start += half;
        }
    }

    /// Counts a new request (its first try is never limited).
    pub fn record_request(&self, now: Instant) {
        let mut w = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        Self::roll(&mut w, now);
        w.requests[1] += 1.0;
    }

    /// Takes one retry from the budget, or says no.
    pub fn try_retry(&self, now: Instant, policy: &RetryPolicy) -> bool {
        let mut w = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        Self::roll(&mut w, now);
        let requests: f64 = w.requests.iter().sum();
        let retries: f64 = w.retries.iter().sum();
        if retries + 1.0 > BUDGET_FLOOR.max(policy.budget * requests) {
            return false;
        }
        w.retries[1] += 1.0;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crds::Duration as D;

    #[test]
    fn backoff_doubles_from_initial_to_the_cap() {
        let b = Backoff {
            initial: D::from_millis(100),
            max: D::from_millis(500),
            multiplier: 2.0,
            jitter: 0.1,
        };
        let delays: Vec<u128> = (1..=5)
            .map(|n| backoff_delay(&b, n, 0.5).as_millis())
            .collect();
        assert_eq!(delays, [100, 200, 400, 500, 500]);
    }

    #[test]
    fn jitter_spreads_within_the_configured_fraction() {
        let b = Backoff::default();
        let low = backoff_delay(&b, 1, 0.0).as_secs_f64();
        let high = backoff_delay(&b, 1, 0.999_999).as_secs_f64();
        assert!((low - 0.09).abs() < 1e-9, "{low}");
        assert!((high - 0.11).abs() < 1e-6, "{high}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_caps_retries_at_a_share_of_requests() {
        let policy = RetryPolicy::default(); // 20%
        let now = Instant::now();
        let budget = RetryBudget::new(now);
        for _ in 0..100 {
            budget.record_request(now);
        }
        let granted = (0..200).filter(|_| budget.try_retry(now, &policy)).count();
        assert_eq!(granted, 100, "the floor");
        for _ in 0..900 {
            budget.record_request(now);
        }
        let more = (0..400).filter(|_| budget.try_retry(now, &policy)).count();
        assert_eq!(more, 100, "20% of 1000 requests");
        // Ten seconds later the window has moved on.
        let later = now + Duration::from_secs(11);
        budget.record_request(later);
        assert!(
            budget.try_retry(later, &policy),
            "the floor lets a quiet route retry"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_route_may_still_retry() {
        let policy = RetryPolicy::default();
        let now = Instant::now();
        let budget = RetryBudget::new(now);
        budget.record_request(now);
        let granted = (0..1000).filter(|_| budget.try_retry(now, &policy)).count();
        assert_eq!(granted, 100);
    }
}
