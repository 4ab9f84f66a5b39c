//! Prometheus metrics.

use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::time::Instant;

use crate::budget::MemoryBudget;
use crate::dialect::Usage;
use crate::table::RoutingTable;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttemptLabels {
    provider: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    /// The route's model as configured (`gpt-4o`, or a pattern such as `gpt-*`).
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteReasonLabels {
    /// The route's model as configured.
    route: String,
    /// Chosen by the gateway from a fixed set.
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderLabels {
    provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteResultLabels {
    /// The route's model as configured.
    route: String,
    /// Chosen by the gateway from a fixed set.
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    /// The route as configured.
    route: String,
    provider: String,
    /// The client's name in the route's client-key Secret (configured, never sent by the
    /// client), or `anonymous` on a route without client keys.
    client: String,
    /// `input` or `output`.
    token_type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderResultLabels {
    provider: String,
    /// Chosen by the gateway from a fixed set.
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BufferLabels {
    buffer: &'static str,
}

/// Buckets for what the gateway itself adds: tens of microseconds up to the cost of a
/// rescue (a failed try, a backoff).
fn added_histogram() -> Histogram {
    Histogram::new([
        0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.1, 1.0, 10.0,
    ])
}

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        60.0,
    ])
}

/// Every metric the gateway exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    requests: Family<RequestLabels, Counter>,
    attempts: Family<AttemptLabels, Counter>,
    recovery_checks: Family<ProviderResultLabels, Counter>,
    tokens: Family<TokenLabels, Counter>,
    rescues: Family<RouteResultLabels, Counter>,
    time_to_first_token: Family<RouteLabels, Histogram, fn() -> Histogram>,
    failovers: Family<RouteReasonLabels, Counter>,
    stream_breaks: Family<RouteReasonLabels, Counter>,
    replays: Family<RouteLabels, Counter>,
    upstream_latency: Family<ProviderLabels, Histogram, fn() -> Histogram>,
    request_duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    added_latency: Family<RouteLabels, Histogram, fn() -> Histogram>,
    breaker_state: Family<ProviderLabels, Gauge>,
    provider_usable: Family<ProviderLabels, Gauge>,
    reloads: Family<ResultLabels, Counter>,
    over_budget: Family<BufferLabels, Counter>,
    buffered_bytes: Gauge,
    budget_bytes: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Self {
            registry: Mutex::new(Registry::with_prefix("switchyard_gateway")),
            requests: Family::default(),
            attempts: Family::default(),
            recovery_checks: Family::default(),
            tokens: Family::default(),
            rescues: Family::default(),
            time_to_first_token: Family::new_with_constructor(latency_histogram),
            failovers: Family::default(),
            stream_breaks: Family::default(),
            replays: Family::default(),
            upstream_latency: Family::new_with_constructor(latency_histogram),
            request_duration: Family::new_with_constructor(latency_histogram),
            added_latency: Family::new_with_constructor(added_histogram),
            breaker_state: Family::default(),
            provider_usable: Family::default(),
            reloads: Family::default(),
            over_budget: Family::default(),
            buffered_bytes: Gauge::default(),
            budget_bytes: Gauge::default(),
        };
        if let Ok(mut r) = m.registry.lock() {
            r.register(
                "requests",
                "Client requests by route (its model as configured, or its pattern) and final status",
                m.requests.clone(),
            );
            r.register(
                "attempts",
                "Upstream tries by provider and outcome",
                m.attempts.clone(),
            );
            r.register(
                "tokens",
                "Tokens used, as providers' usage reports them (estimated from the text for a stream that reported none), by route, provider, client and token_type (input or output)",
                m.tokens.clone(),
            );
            r.register(
                "rescues",
                "Requests that met a failed try, by route and result: rescued (answered after all) or lost (answered with an error)",
                m.rescues.clone(),
            );
            r.register(
                "time_to_first_token_seconds",
                "Time from a streamed request's arrival to its first token, by route",
                m.time_to_first_token.clone(),
            );
            r.register(
                "recovery_checks",
                "Checks of a provider (or one of its models) out of rotation, by provider and result: passed (back in rotation) or failed",
                m.recovery_checks.clone(),
            );
            r.register(
                "failovers",
                "Requests served by another target than the first one tried, by route and reason: provider (another target of the route) or model (a fallback or redirect model)",
                m.failovers.clone(),
            );
            r.register(
                "stream_breaks",
                "Streams that broke after their first token (their provider failed, or the replica reached its drain deadline), by route and result: resumed (elsewhere) or interrupted (ended with an error event)",
                m.stream_breaks.clone(),
            );
            r.register(
                "idempotent_replays",
                "Requests answered from a kept answer to an earlier request with the same Idempotency-Key",
                m.replays.clone(),
            );
            r.register(
                "upstream_latency_seconds",
                "Time to upstream response headers",
                m.upstream_latency.clone(),
            );
            r.register(
                "request_duration_seconds",
                "Time to the client's response headers",
                m.request_duration.clone(),
            );
            r.register(
                "added_latency_seconds",
                "Time to the client's response headers not spent waiting for the provider that served: parsing, routing, and any failed tries before it",
                m.added_latency.clone(),
            );
            r.register(
                "breaker_state",
                "Circuit breaker: 0 closed, 1 half-open, 2 open",
                m.breaker_state.clone(),
            );
            r.register(
                "provider_usable",
                "1 when the provider may take traffic now",
                m.provider_usable.clone(),
            );
            r.register(
                "config_reloads",
                "Configuration loads by result",
                m.reloads.clone(),
            );
            r.register(
                "memory_budget_refusals",
                "Requests refused because the memory budget had no room for what they needed buffered, by buffer",
                m.over_budget.clone(),
            );
            r.register(
                "buffered_bytes",
                "Bytes held against the memory budget now (bodies, answers, stream events, recorded replays)",
                m.buffered_bytes.clone(),
            );
            r.register(
                "memory_budget_bytes",
                "The memory budget for buffered bytes (--memory-budget-bytes)",
                m.budget_bytes.clone(),
            );
        }
        m
    }
}

/// One route's metric handles, resolved once (labels hashed and allocated once, not per
/// request).
#[derive(Debug, Clone)]
pub struct RouteMetrics {
    route: String,
    ok: Counter,
    duration: Histogram,
    added: Histogram,
    /// Failovers to another provider of the route, and to another model.
    failovers: [Counter; 2],
    /// Streams broken after their first token: resumed, interrupted.
    stream_breaks: [Counter; 2],
    /// Requests that met a failed try: rescued, lost.
    rescues: [Counter; 2],
    ttft: Histogram,
    replays: Counter,
}

impl RouteMetrics {
    /// A request rescued by a target other than its first: of another model's route when
    /// `other_model`.
    pub fn failover(&self, other_model: bool) {
        self.failovers[usize::from(other_model)].inc();
    }

    /// A request that met a failed try, and whether it was answered after all.
    pub fn rescue(&self, rescued: bool) {
        self.rescues[usize::from(!rescued)].inc();
    }

    /// A streamed request's first token, `seconds` after it arrived.
    pub fn time_to_first_token(&self, seconds: f64) {
        self.ttft.observe(seconds);
    }

    /// A stream broken after its first token, and whether it was resumed.
    pub fn stream_break(&self, resumed: bool) {
        self.stream_breaks[usize::from(!resumed)].inc();
    }

    /// What the gateway added to a served request.
    pub fn added_latency(&self, seconds: f64) {
        self.added.observe(seconds);
    }

    /// A request answered by idempotent replay.
    pub fn idempotent_replay(&self) {
        self.replays.inc();
    }
}

/// One provider's handles for its common outcome.
#[derive(Debug, Clone)]
pub struct ProviderMetrics {
    success: Counter,
    latency: Histogram,
}

impl Metrics {
    /// Handles for `route` (its model as configured).
    pub fn for_route(&self, route: &str) -> RouteMetrics {
        let labels = RouteLabels {
            route: route.to_owned(),
        };
        RouteMetrics {
            route: route.to_owned(),
            ok: self
                .requests
                .get_or_create(&RequestLabels {
                    route: route.to_owned(),
                    status: 200,
                })
                .clone(),
            duration: self.request_duration.get_or_create(&labels).clone(),
            added: self.added_latency.get_or_create(&labels).clone(),
            failovers: ["provider", "model"].map(|reason| {
                self.failovers
                    .get_or_create(&RouteReasonLabels {
                        route: route.to_owned(),
                        reason,
                    })
                    .clone()
            }),
            stream_breaks: ["resumed", "interrupted"].map(|reason| {
                self.stream_breaks
                    .get_or_create(&RouteReasonLabels {
                        route: route.to_owned(),
                        reason,
                    })
                    .clone()
            }),
            rescues: ["rescued", "lost"].map(|result| {
                self.rescues
                    .get_or_create(&RouteResultLabels {
                        route: route.to_owned(),
                        result,
                    })
                    .clone()
            }),
            ttft: self.time_to_first_token.get_or_create(&labels).clone(),
            replays: self.replays.get_or_create(&labels).clone(),
        }
    }

    /// Tokens an answer of `provider` on `route` used for `client`.
    pub fn tokens(&self, route: &str, provider: &str, client: &str, usage: Usage) {
        for (token_type, n) in [("input", usage.input), ("output", usage.output)] {
            if n > 0 {
                self.tokens
                    .get_or_create(&TokenLabels {
                        route: route.to_owned(),
                        provider: provider.to_owned(),
                        client: client.to_owned(),
                        token_type,
                    })
                    .inc_by(n);
            }
        }
    }

    /// Handles for `provider`.
    pub fn for_provider(&self, provider: &str) -> ProviderMetrics {
        ProviderMetrics {
            success: self
                .attempts
                .get_or_create(&AttemptLabels {
                    provider: provider.to_owned(),
                    outcome: "success",
                })
                .clone(),
            latency: self
                .upstream_latency
                .get_or_create(&ProviderLabels {
                    provider: provider.to_owned(),
                })
                .clone(),
        }
    }

    /// A finished client request on `route`.
    pub fn route_request(&self, route: &RouteMetrics, status: u16, seconds: f64) {
        if status == 200 {
            route.ok.inc();
        } else {
            self.requests
                .get_or_create(&RequestLabels {
                    route: route.route.clone(),
                    status,
                })
                .inc();
        }
        route.duration.observe(seconds);
    }

    /// A successful upstream try of `provider`.
    pub fn provider_success(&self, provider: &ProviderMetrics, latency: f64) {
        provider.success.inc();
        provider.latency.observe(latency);
    }

    /// One upstream try.
    pub fn attempt(&self, provider: &str, outcome: &'static str, latency: Option<f64>) {
        self.attempts
            .get_or_create(&AttemptLabels {
                provider: provider.to_owned(),
                outcome,
            })
            .inc();
        if let Some(s) = latency {
            self.upstream_latency
                .get_or_create(&ProviderLabels {
                    provider: provider.to_owned(),
                })
                .observe(s);
        }
    }

    /// A recovery check of `provider` or one of its models.
    pub fn recovery_check(&self, provider: &str, passed: bool) {
        self.recovery_checks
            .get_or_create(&ProviderResultLabels {
                provider: provider.to_owned(),
                result: if passed { "passed" } else { "failed" },
            })
            .inc();
    }

    /// A configuration load.
    pub fn config_reload(&self, ok: bool) {
        self.reloads
            .get_or_create(&ResultLabels {
                result: if ok { "success" } else { "failure" },
            })
            .inc();
    }

    /// A request refused for lack of room in the memory budget.
    pub fn over_budget(&self, buffer: &'static str) {
        self.over_budget
            .get_or_create(&BufferLabels { buffer })
            .inc();
    }

    /// The text exposition, with provider gauges refreshed from `table` and the memory
    /// gauges from `budget`.
    pub fn render(&self, table: Option<&RoutingTable>, budget: &MemoryBudget) -> String {
        self.buffered_bytes
            .set(i64::try_from(budget.in_use()).unwrap_or(i64::MAX));
        self.budget_bytes
            .set(i64::try_from(budget.total()).unwrap_or(i64::MAX));
        if let Some(table) = table {
            let now = Instant::now();
            for p in table.providers() {
                let labels = ProviderLabels {
                    provider: p.config.name.clone(),
                };
                // A provider's breaker reads as its worst: its endpoint's or any model's.
                let view = p.view(now);
                self.breaker_state
                    .get_or_create(&labels)
                    .set(view.breaker.as_gauge());
                let usable = p.unusable.is_none() && view.unavailable_for_ms.is_none();
                self.provider_usable
                    .get_or_create(&labels)
                    .set(i64::from(usable));
            }
        }
        let mut out = String::new();
        if let Ok(r) = self.registry.lock() {
            let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        }
        out
    }
}
