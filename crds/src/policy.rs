//! `RoutingPolicy`: how each public model name is spread, retried, failed over and degraded.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::duration::Duration;
use crate::status::RoutingPolicyStatus;

/// How traffic for public model names is routed over the providers of a ProviderPool.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "switchyard.dev",
    version = "v1alpha1",
    kind = "RoutingPolicy",
    plural = "routingpolicies",
    singular = "routingpolicy",
    shortname = "rp",
    category = "switchyard",
    namespaced,
    status = "RoutingPolicyStatus",
    derive = "PartialEq",
    doc = "How traffic for public model names is routed over the providers of a ProviderPool.",
    printcolumn(name = "Pool", type_ = "string", json_path = ".spec.poolRef.name"),
    printcolumn(
        name = "Routes",
        type_ = "string",
        json_path = ".status.routes",
        description = "Public model names this policy serves"
    ),
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
    ),
    printcolumn(
        name = "Resolved",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"ResolvedRefs\")].status",
        priority = 1
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].reason",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
// clippy reads the repeated `type_ = ...` of separate printcolumns as duplicates.
#[allow(clippy::duplicated_attributes)]
pub struct RoutingPolicySpec {
    /// The ProviderPool, in the same namespace, whose providers this policy routes to.
    pub pool_ref: PoolRef,

    /// Routes, one per public model name or pattern (at most 64).
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(
        merge_strategy = ListMerge::Map(vec!["model".into()]),
        validation = Rule::new("self.all(r, self.exists_one(o, o.model == r.model))").message("route models must be unique within a policy")
    )]
    pub routes: Vec<Route>,

    /// Retries of a failed request on other providers.
    #[serde(default)]
    pub retry: RetryPolicy,

    /// Time limits of each upstream attempt and of the whole request.
    #[serde(default)]
    pub timeouts: Timeouts,

    /// When to stop sending traffic to a failing provider, and how to probe it back.
    #[serde(default)]
    pub circuit_breaker: CircuitBreaker,

    /// Whether gateways stay in their own region: `preferLocal` (default) uses providers of
    /// other regions only when no local one can serve, `localOnly` never leaves the region,
    /// `global` treats all regions alike.
    #[serde(default)]
    pub regional: RegionalMode,

    /// The answer given when no provider can serve a request. Without it clients get a 503
    /// error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degraded_response: Option<StaticResponse>,

    /// API keys clients must present. Without it the gateway accepts any caller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_auth: Option<ClientAuth>,

    /// Replay of answers to requests retried with the same `Idempotency-Key` header.
    #[serde(default)]
    pub idempotency: Idempotency,
}

/// A reference to a ProviderPool in the same namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PoolRef {
    /// Name of the ProviderPool.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,
}

/// How requests for one public model are served.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.fallbacks) || !self.fallbacks.exists(f, f == self.model)").message("a route cannot fall back to its own model"),
    validation = Rule::new("!has(self.onContextLengthExceeded) || self.onContextLengthExceeded.model != self.model").message("onContextLengthExceeded.model must name a different, larger-context model"),
)]
pub struct Route {
    /// The public model name clients ask for, such as `gpt-4o`; or a pattern ending in `*`
    /// (`gpt-4o*`, `*`) that matches many. Exact names win over patterns, and longer
    /// patterns over shorter ones. For a pattern, targets without `model` receive the name
    /// the client asked for.
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^([A-Za-z0-9][A-Za-z0-9._:/@-]*\*?|\*)$")
    )]
    pub model: String,

    /// How a request picks among usable targets of the best priority tier: `weighted`
    /// (default; random in proportion to weight), `roundRobin`, `latency` (the faster of
    /// two random picks, by recent latency and requests in flight), `leastRequests`, or
    /// `capacity` (most remaining requests/tokens per minute).
    #[serde(default)]
    pub strategy: Strategy,

    /// The providers that can serve this model (at most 16).
    #[schemars(length(min = 1, max = 16))]
    #[x_kube(validation = Rule::new("self.all(t, self.exists_one(o, o.provider == t.provider && (has(o.model) ? o.model : '') == (has(t.model) ? t.model : '')))").message("a provider and model pair may appear only once among a route's targets"))]
    pub targets: Vec<Target>,

    /// Other public models to try, in order, when every target of this route failed. A
    /// request tries each model at most once, so fallbacks that lead back to a model
    /// already tried (a cycle) are skipped; the policy's status points cycles out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 3),
        inner(
            length(min = 1, max = 128),
            regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._:/@-]*$")
        )
    )]
    pub fallbacks: Vec<ModelName>,

    /// Where to send a request the provider refused as too long for the model's context
    /// window. The request goes there directly, without retrying the same model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_context_length_exceeded: Option<ModelRedirect>,

    /// What to do when a provider refuses a request on content policy grounds. Such
    /// refusals are never retried; by default the provider's reason reaches the client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_content_policy: Option<ContentPolicyAction>,
}

/// A public model name (no patterns).
pub type ModelName = String;

/// A provider that can serve a route.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Target {
    /// Name of a provider in the pool.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub provider: String,

    /// Which of the provider's models serves the route, by its public name in the pool.
    /// Defaults to the route's model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._:/@-]*$")
    )]
    pub model: Option<String>,

    /// Share of traffic among targets of the same tier (for example 90 and 10 for a
    /// canary). Defaults to the provider's weight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 10000))]
    pub weight: Option<i32>,

    /// Priority tier, 0 first. Defaults to the provider's priority.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 9))]
    pub priority: Option<i32>,
}

/// Target selection strategy.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum Strategy {
    /// In turn.
    RoundRobin,
    /// Random in proportion to weight.
    #[default]
    Weighted,
    /// The faster of two random picks, by latency EWMA and requests in flight.
    Latency,
    /// The target with the fewest requests in flight.
    LeastRequests,
    /// The target with the most remaining rate-limit capacity.
    Capacity,
}

/// A redirect to another public model.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelRedirect {
    /// Public model name of another route.
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._:/@-]*$")
    )]
    pub model: String,
}

/// The reaction to a content-policy refusal: exactly one of `response` or `model`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.response) != has(self.model)").message("onContentPolicy needs exactly one of response or model"))]
pub struct ContentPolicyAction {
    /// Assistant message returned to the client instead of the provider's refusal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub response: Option<String>,

    /// Public model name of another route to try instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._:/@-]*$")
    )]
    pub model: Option<String>,
}

/// Retries of a failed request: first on every other usable target of the route, tier by
/// tier; then, when none is left untried, on a target already tried; then on the route's
/// fallback models, each the same way. Every try after the first spends from `budget`,
/// and none starts after `timeouts.total`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    /// Tries of any one target within a request, the first included. A target is tried
    /// again only once every other usable target of the route has been tried: after its
    /// `Retry-After` for a 429, after the backoff for a 5xx or a failed connection, and
    /// only when that wait is at most `maxRetryAfter`; a try that timed out is not repeated
    /// on the same target. Moving to another target does not count against this.
    #[serde(default = "default_attempts")]
    #[schemars(range(min = 1, max = 10))]
    pub attempts: i32,

    /// Longest wait before trying the same target again within a request: a 429 asking
    /// for longer (its `Retry-After` or rate-limit reset headers), or a target whose
    /// breaker stays open longer, is not tried again and the request moves on to the
    /// fallbacks. The wait must also end before `timeouts.total`.
    #[serde(default = "default_max_retry_after")]
    pub max_retry_after: Duration,

    /// Waiting time between tries.
    #[serde(default)]
    pub backoff: Backoff,

    /// Which failures are retried. 400, 401, 403 and 404 never are: another try cannot fix
    /// them.
    #[serde(default)]
    pub retry_on: RetryOn,

    /// Retries allowed as a fraction of requests over the last ten seconds (0.2 = one retry
    /// per five requests), on top of ten retries a second that are always allowed, so
    /// retries cannot multiply an outage. A request's first try is never limited.
    #[serde(default = "default_budget")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub budget: f64,
}

fn default_attempts() -> i32 {
    3
}
fn default_max_retry_after() -> Duration {
    Duration::from_secs(5)
}
fn default_budget() -> f64 {
    0.2
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: default_attempts(),
            max_retry_after: default_max_retry_after(),
            backoff: Backoff::default(),
            retry_on: RetryOn::default(),
            budget: default_budget(),
        }
    }
}

/// Exponential backoff with jitter.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!self.initial.matches('^([0-9]+(\\\\.[0-9]+)?(ms|s|m|h))+$') || !self.max.matches('^([0-9]+(\\\\.[0-9]+)?(ms|s|m|h))+$') || (duration(self.initial) <= duration(self.max))").message("backoff.initial must not exceed backoff.max"))]
pub struct Backoff {
    /// Wait before the first retry.
    #[serde(default = "default_backoff_initial")]
    pub initial: Duration,

    /// Longest wait between tries.
    #[serde(default = "default_backoff_max")]
    pub max: Duration,

    /// Each wait is this many times the previous one.
    #[serde(default = "default_multiplier")]
    #[schemars(range(min = 1.0, max = 10.0))]
    pub multiplier: f64,

    /// Random spread applied to each wait, as a fraction (0.1 = ±10%).
    #[serde(default = "default_jitter")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub jitter: f64,
}

fn default_backoff_initial() -> Duration {
    Duration::from_millis(100)
}
fn default_backoff_max() -> Duration {
    Duration::from_secs(30)
}
fn default_multiplier() -> f64 {
    2.0
}
fn default_jitter() -> f64 {
    0.1
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: default_backoff_initial(),
            max: default_backoff_max(),
            multiplier: default_multiplier(),
            jitter: default_jitter(),
        }
    }
}

/// The failures that are retried.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RetryOn {
    /// Retry when the connection to the provider fails or is reset before a response.
    #[serde(default = "default_true")]
    pub connect_error: bool,

    /// Retry when the provider sends no response headers within `timeouts.firstByte`.
    #[serde(default = "default_true")]
    pub first_byte_timeout: bool,

    /// HTTP statuses that are retried.
    #[serde(default = "default_retry_statuses")]
    #[schemars(length(max = 16))]
    #[x_kube(
        merge_strategy = ListMerge::Set,
        validation = Rule::new("self.all(c, c >= 405 && c <= 599)").message("retryOn.statusCodes may only hold 405-599: 400, 401, 403 and 404 are never retried because another try cannot fix them")
    )]
    pub status_codes: Vec<i32>,
}

fn default_true() -> bool {
    true
}
fn default_retry_statuses() -> Vec<i32> {
    vec![429, 500, 502, 503, 504]
}

impl Default for RetryOn {
    fn default() -> Self {
        Self {
            connect_error: true,
            first_byte_timeout: true,
            status_codes: default_retry_statuses(),
        }
    }
}

/// Time limits.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!self.connect.matches('^([0-9]+(\\\\.[0-9]+)?(ms|s|m|h))+$') || !self.total.matches('^([0-9]+(\\\\.[0-9]+)?(ms|s|m|h))+$') || (duration(self.connect) <= duration(self.total))").message("timeouts.connect must not exceed timeouts.total"),
    validation = Rule::new("!self.firstByte.matches('^([0-9]+(\\\\.[0-9]+)?(ms|s|m|h))+$') || !self.total.matches('^([0-9]+(\\\\.[0-9]+)?(ms|s|m|h))+$') || (duration(self.firstByte) <= duration(self.total))").message("timeouts.firstByte must not exceed timeouts.total"),
    validation = Rule::new("!self.connect.matches('^([0-9]+(\\\\.[0-9]+)?(ms|s|m|h))+$') || !self.firstByte.matches('^([0-9]+(\\\\.[0-9]+)?(ms|s|m|h))+$') || !self.streamIdle.matches('^([0-9]+(\\\\.[0-9]+)?(ms|s|m|h))+$') || (duration(self.connect) > duration('0s') && duration(self.firstByte) > duration('0s') && duration(self.streamIdle) > duration('0s'))").message("timeouts must be greater than zero"),
    validation = Rule::new("!has(self.firstToken) || !self.firstToken.matches('^([0-9]+(\\\\.[0-9]+)?(ms|s|m|h))+$') || !self.total.matches('^([0-9]+(\\\\.[0-9]+)?(ms|s|m|h))+$') || (duration(self.firstToken) > duration('0s') && duration(self.firstToken) <= duration(self.total))").message("timeouts.firstToken must be greater than zero and not exceed timeouts.total"),
)]
pub struct Timeouts {
    /// Time to open a connection to a provider.
    #[serde(default = "default_connect")]
    pub connect: Duration,

    /// Time from sending a request until the provider's response headers arrive and, for a
    /// stream, until its first token (SSE comments and keep-alive events do not count). A
    /// provider that stays silent this long is abandoned and the request fails over; the
    /// client has been sent nothing yet.
    #[serde(default = "default_first_byte")]
    pub first_byte: Duration,

    /// For a streamed answer: time from sending the request until its first token (text,
    /// a tool call or a finish; the opening role chunk, SSE comments and keep-alive events
    /// do not count), so a stream can have a tighter time to first token than `firstByte`
    /// gives response headers. A stream without a token in time fails over; the client
    /// has been sent nothing yet. Unset: `firstByte` bounds the first token too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_token: Option<Duration>,

    /// Longest wait for the next token of a streamed answer once it has started; SSE
    /// comments and keep-alive events do not reset it. A stalled stream resumes on another
    /// provider where one can continue it, and otherwise ends with an error event.
    #[serde(default = "default_stream_idle")]
    pub stream_idle: Duration,

    /// Limit on the whole request, all retries and fallbacks included, up to the last
    /// token of a streamed answer (a stream still running then ends with an error event).
    #[serde(default = "default_total")]
    pub total: Duration,
}

fn default_connect() -> Duration {
    Duration::from_secs(2)
}
fn default_first_byte() -> Duration {
    Duration::from_secs(30)
}
fn default_stream_idle() -> Duration {
    Duration::from_secs(15)
}
fn default_total() -> Duration {
    Duration::from_secs(300)
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: default_connect(),
            first_byte: default_first_byte(),
            first_token: None,
            stream_idle: default_stream_idle(),
            total: default_total(),
        }
    }
}

/// A per-provider circuit breaker: closed, then open (no traffic) after too many failures,
/// then half-open (a few probe requests) before closing again.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
// A CEL rule rather than `minimum: 0.01`: the API server compares an integer value such
// as `0` against a truncated integer minimum, so `minimum` alone lets 0 through.
#[x_kube(
    validation = Rule::new("self.failureRate > 0.0").message("circuitBreaker.failureRate must be greater than 0; it is a ratio such as 0.5"),
    validation = Rule::new("!self.window.matches('^([0-9]+(\\\\.[0-9]+)?(ms|s|m|h))+$') || (duration(self.window) > duration('0s') && duration(self.window) <= duration('1h'))").message("circuitBreaker.window must be more than 0s and at most 1h"),
    validation = Rule::new("!self.openFor.matches('^([0-9]+(\\\\.[0-9]+)?(ms|s|m|h))+$') || (duration(self.openFor) > duration('0s') && duration(self.openFor) <= duration('1h'))").message("circuitBreaker.openFor must be more than 0s and at most 1h"),
)]
pub struct CircuitBreaker {
    /// Consecutive failures that open the breaker.
    #[serde(default = "default_breaker_consecutive")]
    #[schemars(range(min = 1, max = 1000))]
    pub consecutive_failures: i32,

    /// Failure ratio over `window` that opens the breaker, once `minRequests` were seen.
    #[serde(default = "default_failure_rate")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub failure_rate: f64,

    /// The sliding window the failure rate is measured over.
    #[serde(default = "default_window")]
    pub window: Duration,

    /// Requests needed in the window before the failure rate counts.
    #[serde(default = "default_min_requests")]
    #[schemars(range(min = 1, max = 100_000))]
    pub min_requests: i32,

    /// How long the breaker stays open before probing the provider again.
    #[serde(default = "default_open_for")]
    pub open_for: Duration,

    /// Requests let through while half-open; all must succeed to close the breaker.
    #[serde(default = "default_half_open_probes")]
    #[schemars(range(min = 1, max = 100))]
    pub half_open_probes: i32,
}

fn default_breaker_consecutive() -> i32 {
    5
}
fn default_failure_rate() -> f64 {
    0.5
}
fn default_window() -> Duration {
    Duration::from_secs(60)
}
fn default_min_requests() -> i32 {
    20
}
fn default_open_for() -> Duration {
    Duration::from_secs(30)
}
fn default_half_open_probes() -> i32 {
    1
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        Self {
            consecutive_failures: default_breaker_consecutive(),
            failure_rate: default_failure_rate(),
            window: default_window(),
            min_requests: default_min_requests(),
            open_for: default_open_for(),
            half_open_probes: default_half_open_probes(),
        }
    }
}

/// Whether gateways stay in their own region.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum RegionalMode {
    /// Providers of other regions serve only when no local one can.
    #[default]
    PreferLocal,
    /// Only providers of the gateway's own region serve.
    LocalOnly,
    /// Every region is alike.
    Global,
}

/// A fixed answer.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StaticResponse {
    /// HTTP status of the answer. 200 returns `message` as a normal assistant reply;
    /// anything else returns it as an OpenAI-style error.
    #[serde(default = "default_degraded_status")]
    #[schemars(range(min = 200, max = 599))]
    pub status: i32,

    /// The text of the answer.
    #[schemars(length(min = 1, max = 4096))]
    pub message: String,
}

fn default_degraded_status() -> i32 {
    503
}

/// Client authentication.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClientAuth {
    /// A Secret in the same namespace; every value in its data is an API key clients may
    /// present as `Authorization: Bearer <key>`. The data key names the client in logs.
    pub secret_ref: SecretRef,

    /// Models particular clients are limited to, by client name (a data key of the
    /// Secret). A client not listed may use every model of the policy; a listed client
    /// asking for another model gets 403 and sees only its models in `/v1/models`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub clients: Vec<ClientModels>,
}

/// The models one client may use.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClientModels {
    /// The client's name: the data key of its API key in the client-key Secret.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub name: String,

    /// Public model names the client may ask for; an entry ending in `*` allows every
    /// model starting with what precedes it (`gpt-4o*`).
    #[schemars(
        length(min = 1, max = 64),
        inner(
            length(min = 1, max = 128),
            regex(pattern = r"^([A-Za-z0-9][A-Za-z0-9._:/@-]*\*?|\*)$")
        )
    )]
    pub models: Vec<String>,
}

/// An idempotency window.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Idempotency {
    /// How long a successful answer to a request carrying an `Idempotency-Key` header is
    /// kept and replayed to a retry with the same key (from the same client), instead of
    /// a second billed upstream call. `0s` turns replay off. Each gateway replica keeps
    /// its own answers, in memory bounded by its `--idempotency-max-bytes`.
    #[serde(default = "default_idempotency_window")]
    pub window: Duration,
}

fn default_idempotency_window() -> Duration {
    Duration::from_secs(600)
}

impl Default for Idempotency {
    fn default() -> Self {
        Self {
            window: default_idempotency_window(),
        }
    }
}

/// A reference to a whole Secret in the same namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// Name of the Secret.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,
}

impl RoutingPolicySpec {
    /// Groups of this policy's routes whose fallbacks lead back to one another (each
    /// group sorted, groups sorted): the strongly connected parts of the fallback graph.
    pub fn fallback_cycles(&self) -> Vec<Vec<String>> {
        let models: Vec<&str> = self.routes.iter().map(|r| r.model.as_str()).collect();
        let index = |m: &str| models.iter().position(|x| *x == m);
        let edges: Vec<Vec<usize>> = self
            .routes
            .iter()
            .map(|r| r.fallbacks.iter().filter_map(|f| index(f)).collect())
            .collect();
        // Reachability by repeated expansion: at most 64 routes, so a quadratic closure
        // is cheap and plain.
        let n = models.len();
        let mut reach = vec![vec![false; n]; n];
        for (from, to) in edges.iter().enumerate() {
            let mut stack: Vec<usize> = to.clone();
            while let Some(next) = stack.pop() {
                if !reach[from][next] {
                    reach[from][next] = true;
                    stack.extend(&edges[next]);
                }
            }
        }
        let mut groups: Vec<Vec<String>> = Vec::new();
        let mut placed = vec![false; n];
        for a in 0..n {
            if placed[a] || !reach[a][a] {
                continue;
            }
            let mut group: Vec<String> = (0..n)
                .filter(|&b| reach[a][b] && reach[b][a])
                .inspect(|&b| placed[b] = true)
                .map(|b| models[b].to_owned())
                .collect();
            group.sort();
            groups.push(group);
        }
        groups.sort();
        groups
    }
}

#[cfg(test)]
mod cycle_tests {
    use super::*;

    #[test]
    fn fallbacks_that_lead_back_are_grouped() {
        let spec: RoutingPolicySpec = serde_json::from_value(serde_json::json!({
            "poolRef": {"name": "p"},
            "routes": [
                {"model": "a", "targets": [{"provider": "x"}], "fallbacks": ["b"]},
                {"model": "b", "targets": [{"provider": "x"}], "fallbacks": ["c"]},
                {"model": "c", "targets": [{"provider": "x"}], "fallbacks": ["a", "d"]},
                {"model": "d", "targets": [{"provider": "x"}]},
                {"model": "e", "targets": [{"provider": "x"}], "fallbacks": ["d"]}
            ]
        }))
        .expect("spec");
        assert_eq!(spec.fallback_cycles(), [["a", "b", "c"]]);
    }
}
