//! What the gateway has learned about its upstreams, at two levels:
//!
//! - per **target** (a provider × one of its models): HTTP-level outcomes — 5xx, 429,
//!   timeouts waiting for an answer, broken streams — because providers rate-limit and
//!   fail per model or deployment;
//! - per **provider** (its endpoint): connection-level outcomes — refused, reset, TLS,
//!   DNS — which no model of it escapes, plus active probes, requests in flight and
//!   quota use.
//!
//! A target is usable only when both levels say so. Each level runs the same state
//! machine, [`Health`]. All decisions take `now` as an argument (tokio's pausable clock
//! in production), so the state machines are tested with paused time and no sleeps.
//!
//! - **Breaker** (policy settings): closed → open after `consecutiveFailures` in a row or
//!   a failure ratio ≥ `failureRate` over `window` with at least `minRequests`; open for
//!   `openFor`; then half-open, letting `halfOpenProbes` requests through; all succeed →
//!   closed, any fails → open again. While open, real requests never pay a try on it.
//! - **Ejection** (provider settings): `consecutiveFailures` in a row eject for
//!   `baseEjectionTime`, each ejection in a row `ejectionGrowth` times longer, capped at
//!   `maxEjectionTime`. A success resets the growth.
//! - **Rate limiting**: a 429 makes the target unusable for exactly as long as its
//!   headers say; it is not a failure and does not move the breaker.
//! - **Recovery checks** (`health.recovery`, see `probe.rs`): while open or ejected, a
//!   passing check brings it back at once and a failing one keeps it out until the next
//!   check, so a real request never has to discover either.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use crds::policy::CircuitBreaker;
use crds::pool::{Limits, PassiveHealth};
use serde::Serialize;
use tokio::time::Instant;

/// The result of one attempt, as far as one level's health is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The provider answered (2xx, or a 4xx that is the client's fault).
    Success,
    /// Connect error, reset, timeout, 5xx, or a broken stream.
    Failure,
    /// 429: unusable for the given time; neither success nor failure.
    RateLimited(Duration),
}

/// Breaker state, as shown in `/status` and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum BreakerState {
    /// Traffic flows.
    Closed,
    /// A bounded number of probe requests are let through.
    HalfOpen,
    /// No traffic until the open period ends.
    Open,
}

impl BreakerState {
    /// The metric value: 0 closed, 1 half-open, 2 open.
    pub fn as_gauge(self) -> i64 {
        match self {
            Self::Closed => 0,
            Self::HalfOpen => 1,
            Self::Open => 2,
        }
    }
}

/// Whether a target may take a request now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    /// Usable.
    Ready,
    /// Not usable before the given instant (ejected, open, or rate limited).
    Until(Instant),
    /// Half-open with every probe slot taken.
    Busy,
}

impl Availability {
    /// A target's availability from its provider's (`self`) and its own: usable only when
    /// both are, and back only when both are back.
    pub fn and(self, other: Self) -> Self {
        match (self, other) {
            (Self::Until(a), Self::Until(b)) => Self::Until(a.max(b)),
            (Self::Until(a), _) | (_, Self::Until(a)) => Self::Until(a),
            (Self::Busy, _) | (_, Self::Busy) => Self::Busy,
            (Self::Ready, Self::Ready) => Self::Ready,
        }
    }
}

#[derive(Debug)]
struct Inner {
    breaker: BreakerState,
    open_until: Instant,
    probes_in_flight: u32,
    probe_successes: u32,
    consecutive_failures: u32,
    ejected_until: Instant,
    ejections_in_row: u32,
    rate_limited_until: Instant,
    /// (when, failed) for the breaker's failure-rate window; bounded by pruning.
    window: VecDeque<(Instant, bool)>,
    latency_ewma_ms: Option<f64>,
    last_reason: Option<&'static str>,
    /// Active probing: consecutive results, and whether probes took the provider out.
    probe_streak: (u32, u32),
    probe_down: bool,
    /// The last active probe's result; `None` before the first or without probes.
    last_probe_ok: Option<bool>,
}

impl Inner {
    /// The breaker as callers should see it: an open breaker whose time is up is
    /// half-open, even before the next availability check moves it there.
    fn effective_breaker(&self, now: Instant) -> BreakerState {
        match self.breaker {
            BreakerState::Open if self.open_until <= now => BreakerState::HalfOpen,
            other => other,
        }
    }
}

/// One level's state machine: a target's (provider × model) or a provider endpoint's.
/// Shared by every route that names it and carried across configuration reloads.
#[derive(Debug)]
pub struct Health {
    inner: Mutex<Inner>,
    /// The model refused a continuation (a prefill) once: it is not asked again.
    refuses_prefill: AtomicBool,
}

/// What a provider's rate-limit headers say about its quota.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitReport {
    /// Requests left in the provider's window.
    pub remaining_requests: Option<u64>,
    /// Tokens left in the provider's window.
    pub remaining_tokens: Option<u64>,
    /// The provider's request limit.
    pub limit_requests: Option<u64>,
    /// The provider's token limit.
    pub limit_tokens: Option<u64>,
}

/// A snapshot for `/status`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthView {
    /// `healthy`, `degraded` or `ejected`.
    pub state: &'static str,
    /// Why, when not healthy.
    pub reason: Option<&'static str>,
    /// Breaker state.
    pub breaker: BreakerState,
    /// Failed share of the recent window.
    pub error_rate: f64,
    /// Latency EWMA in milliseconds.
    pub latency_ms: Option<f64>,
    /// Requests in flight from this replica.
    pub in_flight: u32,
    /// Milliseconds until usable again, when not usable now.
    pub unavailable_for_ms: Option<u64>,
    /// Whether the last active probe succeeded; `None` without active probes.
    pub last_probe_ok: Option<bool>,
    /// Each of the provider's models that routes use, when the provider's own view is
    /// asked for.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<ModelView>,
}

/// One model's health within its provider's view.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelView {
    /// The model as configured (the upstream name, Azure deployment or route pattern).
    pub model: String,
    /// `healthy`, `degraded` or `ejected`.
    pub state: &'static str,
    /// Why, when not healthy.
    pub reason: Option<&'static str>,
    /// Breaker state.
    pub breaker: BreakerState,
    /// Milliseconds until usable again, when not usable now.
    pub unavailable_for_ms: Option<u64>,
}

/// Smoothing of the latency EWMA: the newest sample weighs 30%.
const EWMA_ALPHA: f64 = 0.3;

impl Health {
    /// A level with no history.
    pub fn new(now: Instant) -> Self {
        Self {
            inner: Mutex::new(Inner {
                breaker: BreakerState::Closed,
                open_until: now,
                probes_in_flight: 0,
                probe_successes: 0,
                consecutive_failures: 0,
                ejected_until: now,
                ejections_in_row: 0,
                rate_limited_until: now,
                window: VecDeque::new(),
                latency_ewma_ms: None,
                last_reason: None,
                probe_streak: (0, 0),
                probe_down: false,
                last_probe_ok: None,
            }),
            refuses_prefill: AtomicBool::new(false),
        }
    }

    /// Whether the model refused a continuation before.
    pub fn refuses_prefill(&self) -> bool {
        self.refuses_prefill.load(Ordering::Relaxed)
    }

    /// Remembers that the model refused a continuation; true the first time.
    pub fn learn_refuses_prefill(&self) -> bool {
        !self.refuses_prefill.swap(true, Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave it inconsistent in a way that
        // matters more than refusing traffic would; keep serving.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether this level lets a request through at `now`.
    pub fn availability(&self, now: Instant, breaker: &CircuitBreaker) -> Availability {
        let mut s = self.lock();
        let blocked = s.ejected_until.max(s.rate_limited_until);
        if blocked > now {
            return Availability::Until(blocked);
        }
        if s.probe_down {
            // Down until probes say otherwise; "soon" keeps it a least-bad candidate.
            return Availability::Until(now + Duration::from_secs(1));
        }
        match s.breaker {
            BreakerState::Closed => Availability::Ready,
            BreakerState::Open if s.open_until > now => Availability::Until(s.open_until),
            BreakerState::Open => {
                s.breaker = BreakerState::HalfOpen;
                s.probes_in_flight = 0;
                s.probe_successes = 0;
                Availability::Ready
            }
            BreakerState::HalfOpen if s.probes_in_flight < probe_limit(breaker) => {
                Availability::Ready
            }
            BreakerState::HalfOpen => Availability::Busy,
        }
    }

    /// Marks a request as started here; pair with [`Health::settle`] or
    /// [`Health::release`].
    pub fn begin(&self) {
        let mut s = self.lock();
        if s.breaker == BreakerState::HalfOpen {
            s.probes_in_flight += 1;
        }
    }

    /// A started request that ended without a verdict on this level (the client gave up,
    /// the replica is stopping, or the failure belongs to the other level): a half-open
    /// breaker's probe slot it held is free for another request.
    pub fn release(&self) {
        let mut s = self.lock();
        if s.breaker == BreakerState::HalfOpen && s.probes_in_flight > 0 {
            s.probes_in_flight -= 1;
        }
    }

    /// Records how a started request ended.
    pub fn settle(
        &self,
        now: Instant,
        outcome: Outcome,
        latency: Option<Duration>,
        breaker: &CircuitBreaker,
        passive: &PassiveHealth,
    ) {
        let mut s = self.lock();
        if let Some(latency) = latency {
            let ms = latency.as_secs_f64() * 1000.0;
            s.latency_ewma_ms = Some(
                s.latency_ewma_ms
                    .map_or(ms, |old| old + EWMA_ALPHA * (ms - old)),
            );
        }
        let slow = matches!(outcome, Outcome::Success)
            && latency
                .zip(passive.slow_threshold)
                .is_some_and(|(l, t)| l > t.get());
        let outcome = if slow { Outcome::Failure } else { outcome };
        let was_probe = s.breaker == BreakerState::HalfOpen && s.probes_in_flight > 0;
        if was_probe {
            s.probes_in_flight -= 1;
        }
        match outcome {
            Outcome::RateLimited(wait) => {
                s.rate_limited_until = s.rate_limited_until.max(now + wait);
                s.last_reason = Some("RateLimited");
                if was_probe {
                    // Not a verdict on health: let another probe try later.
                    s.breaker = BreakerState::Open;
                    s.open_until = now + wait;
                }
            }
            Outcome::Success => {
                s.consecutive_failures = 0;
                s.ejections_in_row = 0;
                s.last_reason = None;
                push_window(&mut s.window, now, false, breaker);
                if was_probe {
                    s.probe_successes += 1;
                    if s.probe_successes >= probe_limit(breaker) {
                        s.breaker = BreakerState::Closed;
                        s.window.clear();
                    }
                }
            }
            Outcome::Failure => {
                s.consecutive_failures += 1;
                push_window(&mut s.window, now, true, breaker);
                let open_for = breaker.open_for.get();
                if was_probe {
                    s.breaker = BreakerState::Open;
                    s.open_until = now + open_for;
                    s.last_reason = Some("ProbeFailed");
                } else if s.breaker == BreakerState::Closed && trips(&s, breaker) {
                    s.breaker = BreakerState::Open;
                    s.open_until = now + open_for;
                    s.last_reason = Some("BreakerOpen");
                }
                let threshold = u32::try_from(passive.consecutive_failures)
                    .unwrap_or(u32::MAX)
                    .max(1);
                if s.consecutive_failures >= threshold && s.ejected_until <= now {
                    let growth = passive
                        .ejection_growth
                        .max(1.0)
                        .powi(i32::try_from(s.ejections_in_row).unwrap_or(i32::MAX));
                    let eject = passive
                        .base_ejection_time
                        .get()
                        .mul_f64(growth)
                        .min(passive.max_ejection_time.get());
                    s.ejected_until = now + eject;
                    s.ejections_in_row += 1;
                    s.consecutive_failures = 0;
                    s.last_reason = Some("Ejected");
                }
                if s.last_reason.is_none() {
                    s.last_reason = Some(if slow { "Slow" } else { "Errors" });
                }
            }
        }
    }

    /// Whether failures took this level out of rotation (an open breaker, an
    /// ejection) so that a recovery check should decide when it is back. A 429 rest ends
    /// on its own, at the time the provider gave.
    pub fn needs_recovery(&self, now: Instant) -> bool {
        let s = self.lock();
        s.breaker == BreakerState::Open || s.ejected_until > now
    }

    /// A recovery check passed: back in rotation at once, with a fresh breaker. The
    /// ejection growth stays until real traffic succeeds, so a provider that fails again
    /// straight away is not trusted as quickly.
    pub fn recovered(&self, now: Instant) {
        let mut s = self.lock();
        if s.breaker == BreakerState::Open {
            s.breaker = BreakerState::Closed;
            s.probes_in_flight = 0;
            s.probe_successes = 0;
            s.window.clear();
        }
        s.ejected_until = s.ejected_until.min(now);
        s.consecutive_failures = 0;
        s.last_reason = None;
    }

    /// A recovery check failed: still out, at least until the next check at `next`, so
    /// that no real request is let through to find out again.
    pub fn still_down(&self, now: Instant, next: Instant) {
        let mut s = self.lock();
        if s.breaker == BreakerState::Open {
            s.open_until = s.open_until.max(next);
        }
        if s.ejected_until > now {
            s.ejected_until = s.ejected_until.max(next);
        }
    }

    /// Records an active probe: `unhealthy` failures in a row take the provider out,
    /// `healthy` successes in a row bring it back.
    pub fn record_probe(&self, ok: bool, healthy: u32, unhealthy: u32) {
        let mut s = self.lock();
        s.last_probe_ok = Some(ok);
        let (successes, failures) = &mut s.probe_streak;
        if ok {
            *successes += 1;
            *failures = 0;
        } else {
            *failures += 1;
            *successes = 0;
        }
        let (successes, failures) = s.probe_streak;
        if !s.probe_down && failures >= unhealthy.max(1) {
            s.probe_down = true;
            s.last_reason = Some("ProbeFailed");
        } else if s.probe_down && successes >= healthy.max(1) {
            s.probe_down = false;
            s.last_reason = None;
        }
    }

    /// Latency EWMA in milliseconds; `None` before the first response.
    pub fn latency_ms(&self) -> Option<f64> {
        self.lock().latency_ewma_ms
    }

    /// The breaker's state (an open breaker whose time is up reads as half-open).
    #[cfg(test)]
    pub fn breaker(&self, now: Instant) -> BreakerState {
        self.lock().effective_breaker(now)
    }

    /// A snapshot for `/status` and the pool status (`in_flight` is the provider's).
    pub fn view(&self, now: Instant) -> HealthView {
        let s = self.lock();
        let blocked =
            s.ejected_until
                .max(s.rate_limited_until)
                .max(if s.breaker == BreakerState::Open {
                    s.open_until
                } else {
                    now
                });
        let failures = s.window.iter().filter(|(_, failed)| *failed).count();
        let error_rate = if s.window.is_empty() {
            0.0
        } else {
            failures as f64 / s.window.len() as f64
        };
        // A failed probe below the ejection threshold is a warning sign of its own.
        let probe_failing = s.last_probe_ok == Some(false);
        let state = if blocked > now || s.probe_down {
            "ejected"
        } else if s.breaker != BreakerState::Closed
            || s.consecutive_failures > 0
            || error_rate > 0.05
            || probe_failing
        {
            "degraded"
        } else {
            "healthy"
        };
        HealthView {
            state,
            reason: match state {
                "healthy" => None,
                _ if probe_failing && s.last_reason.is_none() => Some("ProbeFailed"),
                _ => s.last_reason,
            },
            breaker: s.effective_breaker(now),
            error_rate,
            latency_ms: s.latency_ewma_ms,
            in_flight: 0,
            // Probed down: unusable until probes recover, with no known end.
            unavailable_for_ms: if s.probe_down {
                Some(0)
            } else {
                (blocked > now).then(|| {
                    u64::try_from(blocked.duration_since(now).as_millis()).unwrap_or(u64::MAX)
                })
            },
            last_probe_ok: s.last_probe_ok,
            models: Vec::new(),
        }
    }
}

/// A provider endpoint: the connection-level [`Health`], and what every model of it
/// shares — requests in flight and quota use.
#[derive(Debug)]
pub struct ProviderHealth {
    /// Connection-level outcomes and active probes.
    pub link: Health,
    in_flight: AtomicU32,
    usage: Mutex<QuotaUse>,
}

/// Requests started and tokens used in the current minute, and what the provider's
/// rate-limit headers last said, for capacity-aware routing.
#[derive(Debug)]
struct QuotaUse {
    minute_start: Instant,
    minute_requests: u64,
    minute_tokens: u64,
    reported: RateLimitReport,
}

impl QuotaUse {
    fn roll_minute(&mut self, now: Instant) {
        if now.duration_since(self.minute_start) >= Duration::from_secs(60) {
            self.minute_start = now;
            self.minute_requests = 0;
            self.minute_tokens = 0;
        }
    }
}

impl ProviderHealth {
    /// A provider with no history.
    pub fn new(now: Instant) -> Self {
        Self {
            link: Health::new(now),
            in_flight: AtomicU32::new(0),
            usage: Mutex::new(QuotaUse {
                minute_start: now,
                minute_requests: 0,
                minute_tokens: 0,
                reported: RateLimitReport::default(),
            }),
        }
    }

    fn usage(&self) -> std::sync::MutexGuard<'_, QuotaUse> {
        self.usage
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Counts a request as in flight (and against this minute's quota); pair with
    /// [`ProviderHealth::end`].
    pub fn start(&self, now: Instant) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let mut u = self.usage();
        u.roll_minute(now);
        u.minute_requests += 1;
    }

    /// A started request is no longer in flight.
    pub fn end(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Records what a response's rate-limit headers said; absent headers keep the last
    /// value.
    pub fn report_rate_limits(&self, report: RateLimitReport) {
        // Most responses of keyless self-hosted servers carry none: no lock to take.
        if report == RateLimitReport::default() {
            return;
        }
        let mut u = self.usage();
        let r = &mut u.reported;
        r.remaining_requests = report.remaining_requests.or(r.remaining_requests);
        r.remaining_tokens = report.remaining_tokens.or(r.remaining_tokens);
        r.limit_requests = report.limit_requests.or(r.limit_requests);
        r.limit_tokens = report.limit_tokens.or(r.limit_tokens);
    }

    /// Records tokens an answer used (prompt and completion).
    pub fn record_tokens(&self, now: Instant, tokens: u64) {
        let mut u = self.usage();
        u.roll_minute(now);
        u.minute_tokens += tokens;
    }

    /// Requests in flight from this replica.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The share of the provider's quota still free this minute, from 0 to 1: the
    /// tighter of requests and tokens, each the smaller of what the configured limit
    /// leaves after this replica's use and what the provider last reported. A dimension
    /// with no limit known counts as free unless the provider reported none left.
    pub fn headroom(&self, now: Instant, limits: &Limits) -> f64 {
        let u = self.usage();
        let fresh = now.duration_since(u.minute_start) < Duration::from_secs(60);
        let (used_requests, used_tokens) = if fresh {
            (u.minute_requests, u.minute_tokens)
        } else {
            (0, 0)
        };
        let share = |configured: Option<i64>,
                     used: u64,
                     reported_limit: Option<u64>,
                     reported_remaining: Option<u64>| {
            let configured = configured.and_then(|l| u64::try_from(l).ok());
            let Some(limit) = configured.or(reported_limit).filter(|l| *l > 0) else {
                return if reported_remaining == Some(0) {
                    0.0
                } else {
                    1.0
                };
            };
            let by_config = configured.map_or(u64::MAX, |l| l.saturating_sub(used));
            let remaining = by_config.min(reported_remaining.unwrap_or(u64::MAX));
            (remaining as f64 / limit as f64).clamp(0.0, 1.0)
        };
        let r = &u.reported;
        share(
            limits.requests_per_minute,
            used_requests,
            r.limit_requests,
            r.remaining_requests,
        )
        .min(share(
            limits.tokens_per_minute,
            used_tokens,
            r.limit_tokens,
            r.remaining_tokens,
        ))
    }

    /// The provider as a whole: its endpoint's view, ejected also when every model it
    /// serves is out, degraded when some is, with each model's own state listed.
    pub fn view<'a>(
        &self,
        now: Instant,
        models: impl IntoIterator<Item = (&'a str, &'a Health)>,
    ) -> HealthView {
        let mut view = self.link.view(now);
        view.in_flight = self.in_flight();
        let mut all_out = true;
        let mut soonest: Option<(u64, Option<&'static str>)> = None;
        let mut first_trouble = None;
        for (model, health) in models {
            let m = health.view(now);
            view.breaker = view.breaker.max(m.breaker);
            view.error_rate = view.error_rate.max(m.error_rate);
            match m.unavailable_for_ms {
                Some(ms) if soonest.is_none_or(|(best, _)| ms < best) => {
                    soonest = Some((ms, m.reason));
                }
                Some(_) => {}
                None => all_out = false,
            }
            if m.state != "healthy" && first_trouble.is_none() {
                first_trouble = m.reason;
            }
            view.models.push(ModelView {
                model: model.to_owned(),
                state: m.state,
                reason: m.reason,
                breaker: m.breaker,
                unavailable_for_ms: m.unavailable_for_ms,
            });
        }
        if view.state == "ejected" || view.models.is_empty() {
            return view;
        }
        if all_out && let Some((ms, reason)) = soonest {
            view.state = "ejected";
            view.reason = reason;
            view.unavailable_for_ms = Some(ms);
        } else if view.models.iter().any(|m| m.state != "healthy") {
            view.state = "degraded";
            view.reason = view.reason.or(first_trouble);
        }
        view
    }
}

fn probe_limit(breaker: &CircuitBreaker) -> u32 {
    u32::try_from(breaker.half_open_probes).unwrap_or(1).max(1)
}

fn push_window(
    window: &mut VecDeque<(Instant, bool)>,
    now: Instant,
    failed: bool,
    breaker: &CircuitBreaker,
) {
    window.push_back((now, failed));
    let horizon = breaker.window.get();
    while window
        .front()
        .is_some_and(|(t, _)| now.duration_since(*t) > horizon)
    {
        window.pop_front();
    }
    // Bound memory under heavy load: the rate is what matters, not every sample.
    while window.len() > 10_000 {
        window.pop_front();
    }
}

fn trips(s: &Inner, breaker: &CircuitBreaker) -> bool {
    if s.consecutive_failures >= u32::try_from(breaker.consecutive_failures).unwrap_or(u32::MAX) {
        return true;
    }
    let total = s.window.len();
    let failures = s.window.iter().filter(|(_, failed)| *failed).count();
    total >= usize::try_from(breaker.min_requests).unwrap_or(usize::MAX)
        && failures as f64 / total as f64 >= breaker.failure_rate
}

#[cfg(test)]
mod tests {
    use super::*;
    use crds::Duration as D;

    fn breaker() -> CircuitBreaker {
        CircuitBreaker {
            consecutive_failures: 3,
            failure_rate: 0.5,
            window: D::from_secs(60),
            min_requests: 10,
            open_for: D::from_secs(30),
            half_open_probes: 2,
        }
    }

    fn passive() -> PassiveHealth {
        PassiveHealth {
            consecutive_failures: 100,
            ..PassiveHealth::default()
        }
    }

    fn fail(h: &Health, now: Instant, b: &CircuitBreaker, p: &PassiveHealth) {
        h.begin();
        h.settle(now, Outcome::Failure, None, b, p);
    }

    fn ok(h: &Health, now: Instant, b: &CircuitBreaker, p: &PassiveHealth) {
        h.begin();
        h.settle(now, Outcome::Success, Some(Duration::from_millis(10)), b, p);
    }

    #[tokio::test(start_paused = true)]
    async fn breaker_opens_after_consecutive_failures_and_blocks_real_traffic() {
        let (b, p) = (breaker(), passive());
        let now = Instant::now();
        let h = Health::new(now);
        fail(&h, now, &b, &p);
        fail(&h, now, &b, &p);
        assert_eq!(h.availability(now, &b), Availability::Ready);
        fail(&h, now, &b, &p);
        assert_eq!(
            h.availability(now, &b),
            Availability::Until(now + Duration::from_secs(30))
        );
        assert_eq!(h.view(now).state, "ejected");
    }

    #[tokio::test(start_paused = true)]
    async fn breaker_opens_on_failure_rate_once_min_requests_are_seen() {
        let (b, p) = (breaker(), passive());
        let now = Instant::now();
        let h = Health::new(now);
        for _ in 0..4 {
            ok(&h, now, &b, &p);
            fail(&h, now, &b, &p);
        }
        assert_eq!(
            h.availability(now, &b),
            Availability::Ready,
            "8 requests < minRequests"
        );
        ok(&h, now, &b, &p);
        fail(&h, now, &b, &p);
        assert!(
            matches!(h.availability(now, &b), Availability::Until(_)),
            "10 requests at 50% failures"
        );
    }

    /// A provider whose breaker opened now, after three failures in a row.
    fn tripped(b: &CircuitBreaker, p: &PassiveHealth) -> (Health, Instant) {
        let t0 = Instant::now();
        let h = Health::new(t0);
        for _ in 0..3 {
            fail(&h, t0, b, p);
        }
        (h, t0)
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_lets_a_bounded_number_of_probes_through_then_closes() {
        let (b, p) = (breaker(), passive());
        let (h, t0) = tripped(&b, &p);
        let t1 = t0 + Duration::from_secs(30);
        assert_eq!(h.availability(t1, &b), Availability::Ready);
        h.begin();
        assert_eq!(h.availability(t1, &b), Availability::Ready);
        h.begin();
        assert_eq!(
            h.availability(t1, &b),
            Availability::Busy,
            "two probes in flight is the limit"
        );
        h.settle(t1, Outcome::Success, None, &b, &p);
        h.settle(t1, Outcome::Success, None, &b, &p);
        assert_eq!(h.breaker(t1), BreakerState::Closed);
        assert_eq!(h.availability(t1, &b), Availability::Ready);
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_probe_frees_its_slot_and_closes_nothing() {
        let (b, p) = (breaker(), passive());
        let (h, t0) = tripped(&b, &p);
        let t1 = t0 + Duration::from_secs(30);
        assert_eq!(h.availability(t1, &b), Availability::Ready, "half-open");
        h.begin();
        h.begin();
        assert_eq!(h.availability(t1, &b), Availability::Busy);
        // Clients gave up on both: no verdict, but the slots are free again.
        h.release();
        h.release();
        assert_eq!(
            h.breaker(t1),
            BreakerState::HalfOpen,
            "an abandon is no success"
        );
        assert_eq!(h.availability(t1, &b), Availability::Ready);
    }

    #[tokio::test(start_paused = true)]
    async fn breaker_reopens_when_a_probe_fails() {
        let (b, p) = (breaker(), passive());
        let (h, t0) = tripped(&b, &p);
        let t1 = t0 + Duration::from_secs(31);
        assert_eq!(h.availability(t1, &b), Availability::Ready);
        fail(&h, t1, &b, &p);
        assert_eq!(
            h.availability(t1, &b),
            Availability::Until(t1 + Duration::from_secs(30))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limiting_blocks_for_exactly_the_retry_after_and_never_opens_the_breaker() {
        let (b, p) = (breaker(), passive());
        let now = Instant::now();
        let h = Health::new(now);
        for _ in 0..10 {
            h.begin();
            h.settle(
                now,
                Outcome::RateLimited(Duration::from_millis(1500)),
                None,
                &b,
                &p,
            );
        }
        assert_eq!(
            h.availability(now, &b),
            Availability::Until(now + Duration::from_millis(1500))
        );
        assert_eq!(h.breaker(now), BreakerState::Closed);
        assert_eq!(
            h.availability(now + Duration::from_millis(1500), &b),
            Availability::Ready
        );
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_time_grows_with_repeated_ejection_up_to_the_cap() {
        let b = CircuitBreaker {
            consecutive_failures: 1000,
            ..breaker()
        };
        let p = PassiveHealth {
            consecutive_failures: 2,
            base_ejection_time: D::from_secs(10),
            ejection_growth: 2.0,
            max_ejection_time: D::from_secs(30),
            slow_threshold: None,
        };
        let mut now = Instant::now();
        let h = Health::new(now);
        let mut lengths = Vec::new();
        for _ in 0..4 {
            fail(&h, now, &b, &p);
            fail(&h, now, &b, &p);
            let Availability::Until(until) = h.availability(now, &b) else {
                panic!("ejected");
            };
            lengths.push(until.duration_since(now).as_secs());
            now = until;
        }
        assert_eq!(lengths, [10, 20, 30, 30]);
        // A success resets the growth.
        ok(&h, now, &b, &p);
        fail(&h, now, &b, &p);
        fail(&h, now, &b, &p);
        assert_eq!(
            h.availability(now, &b),
            Availability::Until(now + Duration::from_secs(10))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn probes_take_a_provider_out_and_bring_it_back_with_hysteresis() {
        let b = breaker();
        let now = Instant::now();
        let h = Health::new(now);
        assert_eq!(h.view(now).last_probe_ok, None);
        h.record_probe(true, 2, 3);
        assert_eq!(h.view(now).state, "healthy");
        assert_eq!(h.view(now).last_probe_ok, Some(true));
        h.record_probe(false, 2, 3);
        h.record_probe(false, 2, 3);
        assert_eq!(
            h.availability(now, &b),
            Availability::Ready,
            "two failures are below the threshold"
        );
        let view = h.view(now);
        assert_eq!(
            (view.state, view.reason),
            ("degraded", Some("ProbeFailed")),
            "a failing probe shows before it ejects"
        );
        h.record_probe(false, 2, 3);
        assert!(matches!(h.availability(now, &b), Availability::Until(_)));
        h.record_probe(true, 2, 3);
        assert!(
            matches!(h.availability(now, &b), Availability::Until(_)),
            "one success is not enough"
        );
        h.record_probe(true, 2, 3);
        assert_eq!(h.availability(now, &b), Availability::Ready);
    }

    #[tokio::test(start_paused = true)]
    async fn latency_ewma_tracks_recent_responses() {
        let (b, p) = (breaker(), passive());
        let now = Instant::now();
        let h = Health::new(now);
        h.begin();
        h.settle(
            now,
            Outcome::Success,
            Some(Duration::from_millis(100)),
            &b,
            &p,
        );
        h.begin();
        h.settle(
            now,
            Outcome::Success,
            Some(Duration::from_millis(200)),
            &b,
            &p,
        );
        let ms = h.latency_ms().expect("measured");
        assert!((ms - 130.0).abs() < 1e-9, "{ms}");
    }

    #[tokio::test(start_paused = true)]
    async fn answers_slower_than_the_threshold_count_towards_ejection() {
        let b = CircuitBreaker {
            consecutive_failures: 1000,
            ..breaker()
        };
        let p = PassiveHealth {
            consecutive_failures: 2,
            slow_threshold: Some(D::from_millis(500)),
            ..PassiveHealth::default()
        };
        let now = Instant::now();
        let h = Health::new(now);
        let answer = |ms| {
            h.begin();
            h.settle(
                now,
                Outcome::Success,
                Some(std::time::Duration::from_millis(ms)),
                &b,
                &p,
            );
        };
        answer(900);
        answer(100);
        answer(900);
        assert!(
            matches!(h.availability(now, &b), Availability::Ready),
            "a fast answer in between resets the count"
        );
        answer(900);
        assert!(matches!(h.availability(now, &b), Availability::Until(_)));
        assert_eq!(h.view(now).reason, Some("Ejected"));
    }
}
