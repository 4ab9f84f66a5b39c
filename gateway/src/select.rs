//! Choosing the target of the next try.
//!
//! Targets are grouped by tier (lowest first). The first tier with a usable target
//! serves, using the route's strategy among its usable targets; a target this request
//! already tried is skipped. When nothing is usable the least-bad untried target (the one
//! that becomes usable soonest) is tried anyway rather than failing without trying.

use std::sync::atomic::Ordering;

use crds::TargetConfig;
use crds::policy::Strategy;
use rand::Rng;
use tokio::time::Instant;

use crate::health::Availability;
use crate::table::{RouteEntry, RoutingTable};

/// The chosen target, and whether it was chosen only as the least bad.
#[derive(Debug, Clone, Copy)]
pub struct Choice<'a> {
    /// The target.
    pub target: &'a TargetConfig,
    /// True when no target was usable and this one is merely the soonest to recover.
    pub least_bad: bool,
}

/// Picks the next target for `route`, skipping providers in `tried`.
pub fn pick<'a>(
    table: &RoutingTable,
    route: &'a RouteEntry,
    tried: &[String],
    now: Instant,
) -> Option<Choice<'a>> {
    let mut least_bad: Option<(Instant, &'a TargetConfig)> = None;
    let targets = &route.config.targets;
    let mut i = 0;
    while i < targets.len() {
        let tier = targets[i].tier;
        let end = targets[i..]
            .iter()
            .position(|t| t.tier != tier)
            .map_or(targets.len(), |n| i + n);
        let mut usable: Vec<&'a TargetConfig> = Vec::new();
        for t in &targets[i..end] {
            if tried.iter().any(|p| p == &t.provider) {
                continue;
            }
            let Some(p) = table.provider(&t.provider) else {
                continue;
            };
            if p.unusable.is_some() {
                continue;
            }
            // A provider at its concurrency limit takes nothing more from this replica,
            // not even as the least bad.
            if p.config
                .limits
                .max_concurrent
                .is_some_and(|max| i64::from(p.health.in_flight()) >= i64::from(max))
            {
                continue;
            }
            match table.availability(route, t, now) {
                None | Some(Availability::Busy) => {}
                Some(Availability::Ready) => usable.push(t),
                Some(Availability::Until(when)) => {
                    if least_bad.is_none_or(|(best, _)| when < best) {
                        least_bad = Some((when, t));
                    }
                }
            }
        }
        if !usable.is_empty() {
            return Some(Choice {
                target: by_strategy(table, route, &usable, now),
                least_bad: false,
            });
        }
        i = end;
    }
    least_bad.map(|(_, target)| Choice {
        target,
        least_bad: true,
    })
}

fn by_strategy<'a>(
    table: &RoutingTable,
    route: &RouteEntry,
    usable: &[&'a TargetConfig],
    now: Instant,
) -> &'a TargetConfig {
    let mut rng = rand::rng();
    let in_flight = |t: &TargetConfig| {
        table
            .provider(&t.provider)
            .map_or(u32::MAX, |p| p.health.in_flight())
    };
    match route.config.strategy {
        Strategy::RoundRobin => usable[route.next.fetch_add(1, Ordering::Relaxed) % usable.len()],
        Strategy::Weighted => {
            let total: u64 = usable.iter().map(|t| u64::from(t.weight)).sum();
            if total == 0 {
                return usable[rng.random_range(0..usable.len())];
            }
            let mut roll = rng.random_range(0..total);
            for t in usable {
                let w = u64::from(t.weight);
                if roll < w {
                    return t;
                }
                roll -= w;
            }
            usable[usable.len() - 1]
        }
        Strategy::Latency => {
            // Power of two choices: the better of two random picks, scored by latency
            // weighted by load, so one slow provider is avoided without herding.
            let score = |t: &TargetConfig| {
                let latency = route
                    .health_of(t)
                    .and_then(|h| h.latency_ms())
                    .unwrap_or(0.0);
                (latency + 1.0) * f64::from(in_flight(t).saturating_add(1))
            };
            let a = usable[rng.random_range(0..usable.len())];
            let b = usable[rng.random_range(0..usable.len())];
            if score(b) < score(a) { b } else { a }
        }
        Strategy::LeastRequests => {
            let start = rng.random_range(0..usable.len());
            (0..usable.len())
                .map(|k| usable[(start + k) % usable.len()])
                .min_by_key(|t| in_flight(t))
                .unwrap_or(usable[0])
        }
        Strategy::Capacity => {
            let headroom = |t: &TargetConfig| {
                table
                    .provider(&t.provider)
                    .map_or(0.0, |p| p.health.headroom(now, &p.config.limits))
            };
            // Ties (typically: nothing known yet) go round the targets.
            let start = route.next.fetch_add(1, Ordering::Relaxed);
            let mut best = usable[start % usable.len()];
            let mut most = headroom(best);
            for k in 1..usable.len() {
                let t = usable[(start + k) % usable.len()];
                let h = headroom(t);
                if h > most {
                    (best, most) = (t, h);
                }
            }
            best
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::{Outcome, RateLimitReport};
    use crate::table::Secrets;
    use crds::GatewayConfig;
    use serde_json::json;
    use std::time::Duration;

    fn table(strategy: &str) -> RoutingTable {
        table_with_limits(strategy, [json!({}), json!({}), json!({})])
    }

    fn table_with_limits(strategy: &str, limits: [serde_json::Value; 3]) -> RoutingTable {
        let [la, lb, lc] = limits;
        let provider = |name: &str, limits: serde_json::Value| {
            json!({"name": name, "type": "openaiCompatible", "endpoint": "http://127.0.0.1:1", "region": "r", "local": true,
                   "enabled": true, "limits": limits, "health": {"passive": {}}})
        };
        let target = |name: &str, tier: u32, weight: u32| json!({"provider": name, "upstreamModel": "m", "weight": weight, "priority": tier / 2, "tier": tier});
        let config: GatewayConfig = serde_json::from_value(json!({
            "version": 1, "namespace": "ns", "pool": "p", "region": "r",
            "providers": [provider("a", la), provider("b", lb), provider("c", lc)],
            "routes": [{"model": "m", "policy": "p", "strategy": strategy, "regional": "preferLocal",
                        "targets": [target("a", 0, 90), target("b", 0, 10), target("c", 2, 100)],
                        "retry": {}, "timeouts": {}, "circuitBreaker": {"consecutiveFailures": 1}}]
        }))
        .expect("valid config");
        RoutingTable::build(config, &Secrets::default(), None, Instant::now())
    }

    /// Records one answer of `name`'s model on route `m`.
    fn record(t: &RoutingTable, name: &str, now: Instant, outcome: Outcome, ms: Option<u64>) {
        let route = t.route_for("m").expect("route");
        t.record(route, name, now, outcome, ms.map(Duration::from_millis));
    }

    fn eject(t: &RoutingTable, name: &str, now: Instant) {
        record(t, name, now, Outcome::Failure, None);
    }

    #[tokio::test(start_paused = true)]
    async fn weighted_split_follows_the_weights_within_the_first_tier() {
        let t = table("weighted");
        let route = t.route_for("m").expect("route");
        let now = Instant::now();
        let mut a = 0;
        for _ in 0..10_000 {
            match pick(&t, route, &[], now)
                .expect("choice")
                .target
                .provider
                .as_str()
            {
                "a" => a += 1,
                "b" => {}
                other => panic!("tier 1 target {other} chosen while tier 0 is usable"),
            }
        }
        assert!((8700..9300).contains(&a), "a got {a} of 10000");
    }

    #[tokio::test(start_paused = true)]
    async fn fails_over_to_the_next_tier_only_when_the_first_is_unusable() {
        let t = table("roundRobin");
        let route = t.route_for("m").expect("route");
        let now = Instant::now();
        eject(&t, "a", now);
        assert_eq!(
            pick(&t, route, &[], now).expect("choice").target.provider,
            "b"
        );
        eject(&t, "b", now);
        let choice = pick(&t, route, &[], now).expect("choice");
        assert_eq!(
            (choice.target.provider.as_str(), choice.least_bad),
            ("c", false)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn skips_targets_the_request_already_tried() {
        let t = table("roundRobin");
        let route = t.route_for("m").expect("route");
        let now = Instant::now();
        let tried = vec!["a".to_owned(), "b".to_owned()];
        assert_eq!(
            pick(&t, route, &tried, now)
                .expect("choice")
                .target
                .provider,
            "c"
        );
        let all = vec!["a".to_owned(), "b".to_owned(), "c".to_owned()];
        assert!(pick(&t, route, &all, now).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn tries_the_least_bad_target_when_every_target_is_ejected() {
        let t = table("roundRobin");
        let route = t.route_for("m").expect("route");
        let now = Instant::now();
        eject(&t, "a", now);
        eject(&t, "b", now + Duration::from_secs(5));
        eject(&t, "c", now + Duration::from_secs(10));
        let choice = pick(&t, route, &[], now + Duration::from_secs(10)).expect("choice");
        assert_eq!(
            (choice.target.provider.as_str(), choice.least_bad),
            ("a", true)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn round_robin_alternates() {
        let t = table("roundRobin");
        let route = t.route_for("m").expect("route");
        let now = Instant::now();
        let picks: Vec<String> = (0..4)
            .map(|_| {
                pick(&t, route, &[], now)
                    .expect("choice")
                    .target
                    .provider
                    .clone()
            })
            .collect();
        assert_eq!(picks, ["a", "b", "a", "b"]);
    }

    #[tokio::test(start_paused = true)]
    async fn latency_strategy_prefers_the_faster_provider() {
        let t = table("latency");
        let route = t.route_for("m").expect("route");
        let now = Instant::now();
        for (name, ms) in [("a", 500), ("b", 20)] {
            record(&t, name, now, Outcome::Success, Some(ms));
        }
        let b = (0..1000)
            .filter(|_| pick(&t, route, &[], now).expect("choice").target.provider == "b")
            .count();
        // b wins every pair that contains it: 1 - (1/2)^2 = 75%.
        assert!((700..800).contains(&b), "b chosen {b} of 1000");
    }

    #[tokio::test(start_paused = true)]
    async fn least_requests_picks_the_least_loaded() {
        let t = table("leastRequests");
        let route = t.route_for("m").expect("route");
        let now = Instant::now();
        t.provider("a").expect("a").health.start(now);
        for _ in 0..20 {
            assert_eq!(
                pick(&t, route, &[], now).expect("choice").target.provider,
                "b"
            );
        }
    }

    fn picks(t: &RoutingTable, now: Instant, n: usize) -> Vec<String> {
        let route = t.route_for("m").expect("route");
        (0..n)
            .map(|_| {
                pick(t, route, &[], now)
                    .expect("choice")
                    .target
                    .provider
                    .clone()
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn capacity_goes_where_the_most_quota_is_left() {
        let tpm = json!({"tokensPerMinute": 1000, "requestsPerMinute": 100});
        let t = table_with_limits("capacity", [tpm.clone(), tpm, json!({})]);
        let now = Instant::now();
        // Nothing used yet: the two share the load.
        let first = picks(&t, now, 4);
        assert_eq!(first.iter().filter(|p| *p == "a").count(), 2, "{first:?}");
        // a used 900 of its 1000 tokens this minute.
        t.provider("a").expect("a").health.record_tokens(now, 900);
        assert_eq!(picks(&t, now, 5), vec!["b"; 5]);
        // b's own headers say it has 5% of its tokens left: a's 10% is more.
        let b = t.provider("b").expect("b");
        b.health.report_rate_limits(RateLimitReport {
            remaining_tokens: Some(50),
            limit_tokens: Some(1000),
            ..RateLimitReport::default()
        });
        assert_eq!(picks(&t, now, 3), vec!["a"; 3]);
        // b reports half its tokens left: more than a's 10%.
        b.health.report_rate_limits(RateLimitReport {
            remaining_tokens: Some(500),
            ..RateLimitReport::default()
        });
        assert_eq!(picks(&t, now, 3), vec!["b"; 3]);
        // A new minute frees what this replica used (a is back near 100%), but not what
        // b reported.
        let later = now + Duration::from_secs(61);
        assert_eq!(picks(&t, later, 3), vec!["a"; 3]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_provider_at_its_concurrency_limit_takes_nothing_more() {
        let one = json!({"maxConcurrent": 1});
        let t = table_with_limits("roundRobin", [one.clone(), one, json!({})]);
        let now = Instant::now();
        t.provider("a").expect("a").health.start(now);
        assert_eq!(picks(&t, now, 3), vec!["b"; 3]);
        t.provider("b").expect("b").health.start(now);
        assert_eq!(
            picks(&t, now, 2),
            vec!["c"; 2],
            "the next tier serves while the first is full"
        );
    }

    /// Provider `a` serving two models, `m` and `n`, each a route of its own with `b` as
    /// the second choice.
    fn two_models() -> RoutingTable {
        let provider = |name: &str| {
            json!({"name": name, "type": "openaiCompatible", "endpoint": "http://127.0.0.1:1", "region": "r", "local": true,
                   "enabled": true, "limits": {}, "health": {"passive": {"consecutiveFailures": 2}}})
        };
        let route = |model: &str| {
            json!({"model": model, "policy": "p", "strategy": "roundRobin", "regional": "preferLocal",
                   "targets": [{"provider": "a", "upstreamModel": model, "weight": 1, "priority": 0, "tier": 0},
                               {"provider": "b", "upstreamModel": model, "weight": 1, "priority": 1, "tier": 2}],
                   "retry": {}, "timeouts": {}, "circuitBreaker": {"consecutiveFailures": 3}})
        };
        let config: GatewayConfig = serde_json::from_value(json!({
            "version": 1, "namespace": "ns", "pool": "p", "region": "r",
            "providers": [provider("a"), provider("b")],
            "routes": [route("m"), route("n")]
        }))
        .expect("valid config");
        RoutingTable::build(config, &Secrets::default(), None, Instant::now())
    }

    /// Records `outcome` for provider `a`'s target on `model`'s route.
    fn on_a(t: &RoutingTable, model: &str, now: Instant, outcome: Outcome) {
        let route = t.route_for(model).expect("route");
        t.record(route, "a", now, outcome, None);
    }

    fn first_choice(t: &RoutingTable, model: &str, now: Instant) -> String {
        let route = t.route_for(model).expect("route");
        pick(t, route, &[], now)
            .expect("choice")
            .target
            .provider
            .clone()
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_limit_rests_only_the_model_that_hit_it() {
        let t = two_models();
        let now = Instant::now();
        on_a(&t, "m", now, Outcome::RateLimited(Duration::from_secs(5)));
        assert_eq!(first_choice(&t, "m", now), "b");
        assert_eq!(first_choice(&t, "n", now), "a", "n was not limited");
    }

    #[tokio::test(start_paused = true)]
    async fn another_models_successes_do_not_reset_a_failing_models_count() {
        let t = two_models();
        let now = Instant::now();
        on_a(&t, "m", now, Outcome::Failure);
        on_a(&t, "n", now, Outcome::Success);
        on_a(&t, "m", now, Outcome::Failure);
        assert_eq!(
            first_choice(&t, "m", now),
            "b",
            "m: two failures in a row eject"
        );
        assert_eq!(first_choice(&t, "n", now), "a");
        let view = t.provider("a").expect("a").view(now);
        assert_eq!(
            (view.state, view.models.len()),
            ("degraded", 2),
            "one model out of two is a degraded provider: {view:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_connection_takes_every_model_of_the_provider_out() {
        let t = two_models();
        let now = Instant::now();
        let a = t.provider("a").expect("a");
        let route = t.route_for("m").expect("route");
        for _ in 0..2 {
            a.health.link.begin();
            a.health.link.settle(
                now,
                Outcome::Failure,
                None,
                &route.config.circuit_breaker,
                &a.config.health.passive,
            );
        }
        assert_eq!(first_choice(&t, "m", now), "b");
        assert_eq!(first_choice(&t, "n", now), "b");
        assert_eq!(a.view(now).state, "ejected");
    }

    #[tokio::test(start_paused = true)]
    async fn model_health_survives_a_reload() {
        let t = two_models();
        let now = Instant::now();
        on_a(&t, "m", now, Outcome::RateLimited(Duration::from_secs(5)));
        let reloaded = RoutingTable::build(t.config.clone(), &Secrets::default(), Some(&t), now);
        assert_eq!(first_choice(&reloaded, "m", now), "b");
        assert_eq!(first_choice(&reloaded, "n", now), "a");
    }
}
