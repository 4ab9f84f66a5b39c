//! The failover decision, kept pure: given the routing table (health, budgets), the
//! clock and what the tries so far ended with, which target to try next, after what wait,
//! or that nothing is left. The I/O lives in `attempt` and `stream`; this is what a test
//! can script outcome by outcome with paused time.

use std::time::Duration;

use crds::TargetConfig;
use tokio::time::Instant;

use crate::health::Availability;
use crate::retry::backoff_delay;
use crate::select::pick;
use crate::table::{RouteEntry, RoutingTable};

/// What to do next.
#[derive(Debug)]
pub enum Next<'t> {
    /// Try `target` of `route`, after waiting `wait`.
    Try {
        /// The route the target belongs to (a fallback's, after a redirect).
        route: &'t RouteEntry,
        /// The target.
        target: &'t TargetConfig,
        /// Backoff before the try: zero when failing over to a usable target.
        wait: Duration,
        /// No target was usable; this one merely recovers soonest.
        least_bad: bool,
    },
    /// Nothing is left to try; the text says why.
    GiveUp(String),
}

/// How a failed try may be repeated on the same target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Again {
    /// After the route's backoff (a 5xx, a failed connection, a stream broken before its
    /// first token).
    AfterBackoff,
    /// After the wait a 429 asked for.
    After(Duration),
    /// Never: the try timed out, and the same target would most likely cost that again.
    Elsewhere,
}

/// One failed try, for the final error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The provider tried.
    pub provider: String,
    /// The failure's class (`server_error`, `rate_limited`, `timeout`, …).
    pub kind: &'static str,
    /// What went wrong, in words.
    pub why: String,
    /// How the same target may be tried again.
    pub again: Again,
}

/// What a route's content-policy handling asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum OnRefusal<'t> {
    /// Answer with this text instead.
    Answer(&'t str),
    /// The plan moved on to another model; call `next`.
    Redirected,
    /// Pass the provider's refusal to the client.
    PassThrough,
}

/// One request's way through its routes and their targets.
#[derive(Debug)]
pub struct Plan<'t> {
    table: &'t RoutingTable,
    route: &'t RouteEntry,
    deadline: Instant,
    /// Models whose routes were entered, so a redirect or fallback never loops.
    visited: Vec<&'t str>,
    /// The first route's fallbacks not yet considered.
    fallbacks: std::slice::Iter<'t, String>,
    /// Providers tried on the current route, once per try.
    tried: Vec<String>,
    /// Where the current route's failures start in `failures`.
    route_failures: usize,
    /// Tries on the current route.
    route_tries: u32,
    /// Tries in all.
    tries: u32,
    /// Set when the current route is done and the next should be a specific model.
    redirect: Option<&'t str>,
    /// The current route is done (its targets ran out, or it redirected).
    route_done: bool,
    /// Every failed try, in order.
    failures: Vec<Failure>,
}

impl<'t> Plan<'t> {
    /// A plan for a request to `first`, which must be done by `deadline`.
    pub fn new(table: &'t RoutingTable, first: &'t RouteEntry, deadline: Instant) -> Self {
        Self {
            table,
            route: first,
            deadline,
            visited: vec![first.config.model.as_str()],
            fallbacks: first.config.fallbacks.iter(),
            tried: Vec::new(),
            route_failures: 0,
            route_tries: 0,
            tries: 0,
            redirect: None,
            route_done: false,
            failures: Vec::new(),
        }
    }

    /// Every failed try so far, in order.
    pub fn failures(&self) -> &[Failure] {
        &self.failures
    }

    /// Tries made so far.
    pub fn tries(&self) -> u32 {
        self.tries
    }

    /// Providers tried on the current route, the last one included.
    pub fn tried(&self) -> &[String] {
        &self.tried
    }

    /// The next step at `now`; `unit` (uniform in [0, 1)) jitters the backoff.
    ///
    /// Every usable target of the route is tried once, tier by tier, before any is tried
    /// again; a target is tried again (up to `retry.attempts` tries) only when the wait it
    /// needs ends before the deadline; then the next fallback model's route, the same way.
    pub fn next(&mut self, now: Instant, unit: f64) -> Next<'t> {
        loop {
            if now >= self.deadline {
                let out = format!(
                    "the request's total timeout ({}) ran out",
                    self.route.config.timeouts.total
                );
                return Next::GiveUp(if self.failures.is_empty() {
                    out
                } else {
                    format!("{out}; {}", self.summary())
                });
            }
            let step = if self.route_done {
                None
            } else {
                // A target known to be out is worth a try only when no fallback model
                // has one in rotation.
                self.another_target(now, unit)
                    .filter(|(_, _, least_bad)| !least_bad || !self.usable_ahead(now))
                    .or_else(|| self.same_target_again(now, unit))
            };
            let Some((target, wait, least_bad)) = step else {
                if !self.enter_next_route() {
                    return Next::GiveUp(self.summary());
                }
                continue;
            };
            if self.tries > 0 && !self.route.budget.try_retry(now, &self.route.config.retry) {
                return Next::GiveUp(format!(
                    "{}; the retry budget is spent, so no further tries were made",
                    self.summary()
                ));
            }
            self.tries += 1;
            self.route_tries += 1;
            self.tried.push(target.provider.clone());
            return Next::Try {
                route: self.route,
                target,
                wait,
                least_bad,
            };
        }
    }

    /// A target of the route not yet tried, with the wait before it: none when failing
    /// over to a usable target (that is the rescue), the backoff when the only choice
    /// left is one already known to be unwell, so a struggling provider is not hammered.
    fn another_target(
        &self,
        now: Instant,
        unit: f64,
    ) -> Option<(&'t TargetConfig, Duration, bool)> {
        let choice = pick(self.table, self.route, &self.tried, now)?;
        let wait = if self.route_tries > 0 && choice.least_bad {
            backoff_delay(&self.route.config.retry.backoff, self.route_tries, unit)
                .min(self.deadline.saturating_duration_since(now))
        } else {
            Duration::ZERO
        };
        Some((choice.target, wait, choice.least_bad))
    }

    /// Whether a fallback model not yet visited has a target in rotation now.
    fn usable_ahead(&self, now: Instant) -> bool {
        self.fallbacks
            .clone()
            .map(String::as_str)
            .filter(|m| !self.visited.contains(m))
            .filter_map(|m| self.table.route_for(m).filter(|r| r.config.model == m))
            .any(|route| {
                route.config.targets.iter().any(|t| {
                    self.table
                        .provider(&t.provider)
                        .is_some_and(|p| p.unusable.is_none())
                        && self.table.availability(route, t, now) == Some(Availability::Ready)
                })
            })
    }

    /// A target tried before, once no untried one is left: the one whose wait ends
    /// soonest among those with tries left and a wait that ends before the deadline.
    fn same_target_again(
        &self,
        now: Instant,
        unit: f64,
    ) -> Option<(&'t TargetConfig, Duration, bool)> {
        let retry = &self.route.config.retry;
        let attempts = usize::try_from(retry.attempts).unwrap_or(1).max(1);
        let mut best: Option<(&'t TargetConfig, Duration)> = None;
        let here = &self.failures[self.route_failures..];
        for (
            i,
            Failure {
                provider, again, ..
            },
        ) in here.iter().enumerate()
        {
            // A target's last failure on this route decides how it may be tried again.
            if here[i + 1..]
                .iter()
                .any(|later| &later.provider == provider)
            {
                continue;
            }
            let tries = self.tried.iter().filter(|p| *p == provider).count();
            if tries >= attempts {
                continue;
            }
            let Some(target) = self
                .route
                .config
                .targets
                .iter()
                .find(|t| &t.provider == provider)
            else {
                continue;
            };
            if self
                .table
                .provider(provider)
                .is_none_or(|p| p.unusable.is_some())
            {
                continue;
            }
            let mut wait = match *again {
                Again::Elsewhere => continue,
                Again::After(wait) => wait,
                Again::AfterBackoff => backoff_delay(
                    &retry.backoff,
                    u32::try_from(tries).unwrap_or(u32::MAX),
                    unit,
                ),
            };
            // An open breaker or a rest the provider asked for also has to be over.
            match self.table.availability(self.route, target, now) {
                Some(Availability::Ready) => {}
                Some(Availability::Until(when)) => {
                    wait = wait.max(when.saturating_duration_since(now));
                }
                None | Some(Availability::Busy) => continue,
            }
            if wait > retry.max_retry_after.get() || now + wait >= self.deadline {
                continue;
            }
            if best.is_none_or(|(_, w)| wait < w) {
                best = Some((target, wait));
            }
        }
        best.map(|(target, wait)| (target, wait, false))
    }

    /// The last try failed in a way another try may fix: remember why, and how the same
    /// target could be tried again.
    pub fn failed(&mut self, kind: &'static str, why: String, again: Again) {
        let Some(provider) = self.tried.last().cloned() else {
            return;
        };
        self.failures.push(Failure {
            provider,
            kind,
            why,
            again,
        });
    }

    /// Why the request could not be served: every failed try, in order.
    fn summary(&self) -> String {
        match self.failures.as_slice() {
            [] => "no provider could be tried".to_owned(),
            [one] => one.why.clone(),
            all => all
                .iter()
                .enumerate()
                .map(|(i, f)| format!("try {}: {}", i + 1, f.why))
                .collect::<Vec<_>>()
                .join("; "),
        }
    }

    /// The last try's prompt did not fit its model: true when the route names a larger
    /// model not yet tried, which the next step moves to.
    pub fn context_length_exceeded(&mut self) -> bool {
        let route = self.route;
        self.redirect_to(route.config.on_context_length_exceeded.as_deref())
    }

    /// The last try was refused on content-policy grounds: what the route says to do.
    pub fn refused(&mut self) -> OnRefusal<'t> {
        let route = self.route;
        match &route.config.on_content_policy {
            Some(action) if action.response.is_some() => {
                OnRefusal::Answer(action.response.as_deref().unwrap_or_default())
            }
            Some(action) if self.redirect_to(action.model.as_deref()) => OnRefusal::Redirected,
            _ => OnRefusal::PassThrough,
        }
    }

    fn redirect_to(&mut self, model: Option<&'t str>) -> bool {
        match model {
            Some(m) if !self.visited.contains(&m) => {
                self.redirect = Some(m);
                self.route_done = true;
                true
            }
            _ => false,
        }
    }

    /// Moves to the redirect target, else the next fallback not yet visited; false when
    /// none is left (or routed).
    fn enter_next_route(&mut self) -> bool {
        let visited = &self.visited;
        let next = self.redirect.take().or_else(|| {
            self.fallbacks
                .by_ref()
                .map(String::as_str)
                .find(|m| !visited.contains(m))
        });
        let Some(route) =
            next.and_then(|m| self.table.route_for(m).filter(|r| r.config.model == m))
        else {
            return false;
        };
        self.visited.push(route.config.model.as_str());
        self.route = route;
        self.tried.clear();
        self.route_failures = self.failures.len();
        self.route_tries = 0;
        self.route_done = false;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::Outcome;
    use crate::table::Secrets;
    use crds::GatewayConfig;
    use serde_json::{Value, json};

    /// Route `m`: a, b and c in tiers 0, 1 and 2; falls back to `big` (target d), which a
    /// too-long prompt also goes to; `strict` refuses with a canned answer.
    fn table(retry: Value) -> RoutingTable {
        let provider = |name: &str| {
            json!({"name": name, "type": "openaiCompatible", "endpoint": "http://127.0.0.1:1", "region": "r", "local": true,
                   "enabled": true, "limits": {}, "health": {"passive": {"consecutiveFailures": 1}}})
        };
        let target = |name: &str, tier: u32| json!({"provider": name, "upstreamModel": "m", "weight": 1, "priority": tier, "tier": tier});
        let route = |model: &str, targets: Value, extra: Value| {
            let mut r = json!({"model": model, "policy": "p", "strategy": "weighted", "regional": "preferLocal",
                               "targets": targets, "retry": retry, "timeouts": {"total": "60s"},
                               "circuitBreaker": {"consecutiveFailures": 1}});
            if let (Some(r), Some(extra)) = (r.as_object_mut(), extra.as_object()) {
                r.extend(extra.clone());
            }
            r
        };
        let config: GatewayConfig = serde_json::from_value(json!({
            "version": 1, "namespace": "ns", "pool": "p", "region": "r",
            "providers": [provider("a"), provider("b"), provider("c"), provider("d")],
            "routes": [
                route("m", json!([target("a", 0), target("b", 1), target("c", 2)]),
                      json!({"fallbacks": ["big"], "onContextLengthExceeded": "big",
                             "onContentPolicy": {"model": "big"}})),
                route("big", json!([target("d", 0)]), json!({"onContextLengthExceeded": "m"})),
                route("strict", json!([target("a", 0)]),
                      json!({"onContentPolicy": {"response": "I cannot help with that."}})),
            ]
        }))
        .expect("valid config");
        RoutingTable::build(config, &Secrets::default(), None, Instant::now())
    }

    fn fail(t: &RoutingTable, route: &RouteEntry, provider: &str, now: Instant) {
        record(t, route, provider, now, Outcome::Failure);
    }

    fn record(
        t: &RoutingTable,
        route: &RouteEntry,
        provider: &str,
        now: Instant,
        outcome: Outcome,
    ) {
        t.record(route, provider, now, outcome, None);
    }

    /// Runs `plan` to the end, every try failing with `kind`, which the plan hears as
    /// `again` and the provider's health as `outcome` (if any): the providers tried, with
    /// their waits, and why the plan gave up.
    fn run(
        t: &RoutingTable,
        plan: &mut Plan<'_>,
        kind: &'static str,
        again: Again,
        outcome: Option<Outcome>,
    ) -> (Vec<(String, Duration)>, String) {
        let mut tried = Vec::new();
        loop {
            let now = Instant::now();
            match plan.next(now, 0.5) {
                Next::Try {
                    route,
                    target,
                    wait,
                    ..
                } => {
                    if let Some(outcome) = outcome {
                        record(t, route, &target.provider, now, outcome);
                    }
                    plan.failed(kind, format!("{} failed", target.provider), again);
                    tried.push((target.provider.clone(), wait));
                }
                Next::GiveUp(why) => return (tried, why),
            }
        }
    }

    /// `run` with every try a server error that the provider's health counts.
    fn fail_every_try(t: &RoutingTable, plan: &mut Plan<'_>) -> (Vec<(String, Duration)>, String) {
        run(
            t,
            plan,
            "server_error",
            Again::AfterBackoff,
            Some(Outcome::Failure),
        )
    }

    /// `run` on route `big`, whose one target `d` fails every try with `kind` (resting for
    /// the wait a 429 asked for, its breaker left closed): the waits before each try.
    fn lone_target(
        t: &RoutingTable,
        plan: &mut Plan<'_>,
        kind: &'static str,
        again: Again,
    ) -> (Vec<Duration>, String) {
        let outcome = match again {
            Again::After(rest) => Some(Outcome::RateLimited(rest)),
            _ => None,
        };
        let (tried, why) = run(t, plan, kind, again, outcome);
        assert!(tried.iter().all(|(p, _)| p == "d"), "{tried:?}");
        (tried.into_iter().map(|(_, wait)| wait).collect(), why)
    }

    fn names(tried: &[(String, Duration)]) -> Vec<&str> {
        tried.iter().map(|(p, _)| p.as_str()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn failures_move_through_the_tiers_then_the_fallback_without_waiting() {
        let t = table(json!({"attempts": 3}));
        let m = t.route_for("m").expect("route");
        let mut plan = Plan::new(&t, m, Instant::now() + Duration::from_secs(60));
        let (tried, why) = fail_every_try(&t, &mut plan);
        assert_eq!(names(&tried), ["a", "b", "c", "d"]);
        assert!(tried.iter().all(|(_, wait)| wait.is_zero()), "{tried:?}");
        assert_eq!(
            why, "try 1: a failed; try 2: b failed; try 3: c failed; try 4: d failed",
            "every try is reported, in order"
        );
        assert_eq!(plan.tries(), 4);
        // Their breakers opened for 30 s, longer than `maxRetryAfter`: none is tried again.
    }

    #[tokio::test(start_paused = true)]
    async fn every_target_is_tried_whatever_the_attempts() {
        let t = table(json!({"attempts": 1}));
        let m = t.route_for("m").expect("route");
        let mut plan = Plan::new(&t, m, Instant::now() + Duration::from_secs(60));
        let (tried, _) = fail_every_try(&t, &mut plan);
        assert_eq!(names(&tried), ["a", "b", "c", "d"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_target_is_tried_again_after_the_retry_after_it_asked_for() {
        let t = table(json!({"attempts": 3}));
        let big = t.route_for("big").expect("route");
        let mut plan = Plan::new(&t, big, Instant::now() + Duration::from_secs(60));
        let second = Duration::from_secs(1);
        let (waits, why) = lone_target(&t, &mut plan, "rate_limited", Again::After(second));
        assert_eq!(waits, [Duration::ZERO, second, second]);
        assert_eq!(why, "try 1: d failed; try 2: d failed; try 3: d failed");
        let kinds: Vec<&str> = plan.failures().iter().map(|f| f.kind).collect();
        assert_eq!(kinds, ["rate_limited"; 3]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_after_longer_than_the_cap_moves_on_at_once() {
        let t = table(json!({"attempts": 3, "maxRetryAfter": "5s"}));
        let big = t.route_for("big").expect("route");
        let mut plan = Plan::new(&t, big, Instant::now() + Duration::from_secs(60));
        let rest = Again::After(Duration::from_secs(6));
        let (waits, _) = lone_target(&t, &mut plan, "rate_limited", rest);
        assert_eq!(waits, [Duration::ZERO], "one try, no wait for a 6 s rest");
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_target_that_errs_is_tried_again_after_a_growing_backoff() {
        let t = table(
            json!({"attempts": 3, "backoff": {"initial": "100ms", "max": "1s", "multiplier": 2, "jitter": 0}}),
        );
        let big = t.route_for("big").expect("route");
        let mut plan = Plan::new(&t, big, Instant::now() + Duration::from_secs(60));
        let (waits, _) = lone_target(&t, &mut plan, "server_error", Again::AfterBackoff);
        let ms = Duration::from_millis;
        assert_eq!(waits, [Duration::ZERO, ms(100), ms(200)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_try_that_timed_out_is_not_repeated_on_the_same_target() {
        let t = table(json!({"attempts": 3}));
        let big = t.route_for("big").expect("route");
        let mut plan = Plan::new(&t, big, Instant::now() + Duration::from_secs(60));
        let (waits, why) = lone_target(&t, &mut plan, "timeout", Again::Elsewhere);
        assert_eq!(waits, [Duration::ZERO]);
        assert_eq!(why, "d failed");
        assert_eq!(plan.failures()[0].kind, "timeout");
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_that_would_end_after_the_deadline_is_not_made() {
        let t = table(json!({"attempts": 3}));
        let big = t.route_for("big").expect("route");
        let mut plan = Plan::new(&t, big, Instant::now() + Duration::from_millis(500));
        let rest = Again::After(Duration::from_secs(1));
        let (waits, _) = lone_target(&t, &mut plan, "rate_limited", rest);
        assert_eq!(waits, [Duration::ZERO]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_target_known_to_be_down_is_skipped_while_a_fallback_model_is_in_rotation() {
        let t = table(json!({"attempts": 3}));
        let m = t.route_for("m").expect("route");
        let now = Instant::now();
        for p in ["a", "b", "c"] {
            fail(&t, m, p, now);
        }
        let mut plan = Plan::new(&t, m, now + Duration::from_secs(60));
        let (tried, _) = fail_every_try(&t, &mut plan);
        assert_eq!(tried[0], ("d".to_owned(), Duration::ZERO), "{tried:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn when_everything_is_down_the_least_bad_is_tried_after_a_backoff() {
        let t = table(
            json!({"attempts": 3, "backoff": {"initial": "100ms", "max": "1s", "multiplier": 2, "jitter": 0}}),
        );
        let m = t.route_for("m").expect("route");
        let big = t.route_for("big").expect("route");
        let now = Instant::now();
        for p in ["a", "b", "c"] {
            fail(&t, m, p, now);
        }
        fail(&t, big, "d", now);
        let mut plan = Plan::new(&t, m, now + Duration::from_secs(60));
        let (tried, _) = fail_every_try(&t, &mut plan);
        let order: Vec<&str> = tried.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(order[..4], ["a", "b", "c", "d"], "{tried:?}");
        let waits: Vec<Duration> = tried.iter().map(|(_, w)| *w).collect();
        assert_eq!(
            waits[..3],
            [
                Duration::ZERO,
                Duration::from_millis(100),
                Duration::from_millis(200)
            ],
            "{tried:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_is_tried_after_the_deadline() {
        let t = table(json!({"attempts": 3}));
        let m = t.route_for("m").expect("route");
        let mut plan = Plan::new(&t, m, Instant::now() + Duration::from_secs(5));
        assert!(matches!(plan.next(Instant::now(), 0.5), Next::Try { .. }));
        tokio::time::advance(Duration::from_secs(5)).await;
        match plan.next(Instant::now(), 0.5) {
            Next::GiveUp(why) => assert!(why.contains("total timeout (1m) ran out"), "{why}"),
            other => panic!("tried after the deadline: {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_spent_retry_budget_stops_after_the_first_try() {
        let t = table(json!({"attempts": 3, "budget": 0.0}));
        let m = t.route_for("m").expect("route");
        let now = Instant::now();
        while m.budget.try_retry(now, &m.config.retry) {}
        let mut plan = Plan::new(&t, m, now + Duration::from_secs(60));
        let (tried, why) = fail_every_try(&t, &mut plan);
        assert_eq!(names(&tried), ["a"]);
        assert!(
            why.starts_with("a failed; the retry budget is spent"),
            "{why}"
        );
        assert_eq!(plan.failures().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_prompt_too_long_moves_to_the_larger_model_once() {
        let t = table(json!({"attempts": 3}));
        let m = t.route_for("m").expect("route");
        let mut plan = Plan::new(&t, m, Instant::now() + Duration::from_secs(60));
        assert!(
            matches!(plan.next(Instant::now(), 0.5), Next::Try { target, .. } if target.provider == "a")
        );
        assert!(plan.context_length_exceeded());
        match plan.next(Instant::now(), 0.5) {
            Next::Try { route, target, .. } => {
                assert_eq!(
                    (route.config.model.as_str(), target.provider.as_str()),
                    ("big", "d")
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(
            !plan.context_length_exceeded(),
            "big points back at m, which was tried: the error stands"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_is_answered_redirected_or_passed_on_as_the_route_says() {
        let t = table(json!({}));
        let deadline = Instant::now() + Duration::from_secs(60);
        let strict = t.route_for("strict").expect("route");
        let mut plan = Plan::new(&t, strict, deadline);
        let _ = plan.next(Instant::now(), 0.5);
        assert_eq!(
            plan.refused(),
            OnRefusal::Answer("I cannot help with that.")
        );

        let m = t.route_for("m").expect("route");
        let mut plan = Plan::new(&t, m, deadline);
        let _ = plan.next(Instant::now(), 0.5);
        assert_eq!(plan.refused(), OnRefusal::Redirected);
        assert!(
            matches!(plan.next(Instant::now(), 0.5), Next::Try { target, .. } if target.provider == "d")
        );
        assert_eq!(
            plan.refused(),
            OnRefusal::PassThrough,
            "big has no policy of its own"
        );
    }
}
