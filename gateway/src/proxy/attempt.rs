//! One try: send the request to a target's provider, wait for its headers within the
//! first-byte timeout, and read the answer or classify the failure for the plan.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use crds::policy::CircuitBreaker;
use crds::pool::PassiveHealth;
use crds::{RouteConfig, TargetConfig};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use tokio::time::Instant;

use super::ClientRequest;
use super::plan::Again;
use super::stream::{Resume, Source, stream};
use crate::budget::{HeldBody, ReadError, ReadLimits, declared_length, read_body};
use crate::dialect::{ErrorClass, Operation, build_request};
use crate::error::GatewayError;
use crate::gateway::Gateway;
use crate::health::{Health, Outcome, ProviderHealth};
use crate::otel::TrySpan;
use crate::response::{Body, json_response};
use crate::server::over_budget;
use crate::sse::SseReader;
use crate::table::{ProviderEntry, RouteEntry, RoutingTable};

/// Largest upstream error or non-streamed body read.
const MAX_UPSTREAM_BODY: usize = 64 << 20;

/// How one try ended.
pub(super) enum Tried {
    /// The answer for the client, and the provider's share of the time.
    Answer(Response<Body>, Duration),
    /// A transient failure; another try may do better.
    Retry(Retry),
    /// A failure another try cannot fix; passed to the client as is.
    Final(Response<Body>),
    /// The prompt does not fit the model.
    ContextLength(Response<Body>),
    /// The provider refused on content-policy grounds.
    ContentPolicy(Response<Body>),
}

/// A failed try that another may fix.
pub(super) struct Retry {
    /// What went wrong, in words (never with the key).
    pub(super) why: String,
    /// The failure's class, as the attempts metric names it.
    pub(super) kind: &'static str,
    /// How the same target may be tried again.
    pub(super) again: Again,
}

impl Tried {
    /// A failure after which the same target may be tried again after a backoff.
    pub(super) fn retry(kind: &'static str, why: String) -> Self {
        Self::Retry(Retry {
            why,
            kind,
            again: Again::AfterBackoff,
        })
    }

    /// A failure worth retrying on another target only: a provider that let a deadline
    /// pass would most likely cost the same wait again.
    pub(super) fn elsewhere(kind: &'static str, why: String) -> Self {
        Self::Retry(Retry {
            why,
            kind,
            again: Again::Elsewhere,
        })
    }
}

/// A request whose response headers arrived.
pub(super) struct Sent {
    pub(super) resp: Response<Incoming>,
    pub(super) inflight: InFlight,
    /// Time to the response headers.
    pub(super) latency: Duration,
    /// When the request was sent.
    pub(super) t0: Instant,
}

/// Why no response headers arrived; health has recorded it.
pub(super) enum SendError {
    /// Not within the first-byte timeout.
    TimedOut,
    /// The connection failed (described, never with the key).
    Connect(String),
}

/// Sends `upstream` to `provider` for the model whose health is `model` and waits for
/// its response headers for at most `first_byte`. A failed connection counts against
/// the provider's endpoint, a timeout against the model; once headers arrive the
/// endpoint is known to work and the caller records the model's outcome.
pub(super) async fn send(
    gw: &Gateway,
    provider: &ProviderEntry,
    model: Arc<Health>,
    rc: &RouteConfig,
    mut upstream: Request<Full<Bytes>>,
    first_byte: Duration,
    span: &TrySpan,
) -> Result<Sent, SendError> {
    let name = provider.config.name.as_str();
    gw.tracing.inject(span, upstream.headers_mut());
    let mut inflight = InFlight::start(
        provider.health.clone(),
        model,
        rc,
        &provider.config.health.passive,
        span.clone(),
    );
    let t0 = Instant::now();
    let sent = gw.request(rc.timeouts.connect.get(), upstream);
    match tokio::time::timeout(first_byte, sent).await {
        Err(_) => {
            inflight.finish(Outcome::Failure, None);
            gw.metrics.attempt(name, "timeout", None);
            Err(SendError::TimedOut)
        }
        Ok(Err(e)) => {
            inflight.link_failed();
            gw.metrics.attempt(name, "connect_error", None);
            Err(SendError::Connect(describe_client_error(&e)))
        }
        Ok(Ok(resp)) => {
            let latency = t0.elapsed();
            inflight.connected(latency);
            span.status(resp.status().as_u16());
            Ok(Sent {
                resp,
                inflight,
                latency,
                t0,
            })
        }
    }
}

/// Records a started request's outcome exactly once on each level: the provider's
/// endpoint (did a response come back at all?) and the model (was it a good one?). A
/// request abandoned by the client counts as neither success nor failure.
pub(super) struct InFlight {
    pub(super) provider: Arc<ProviderHealth>,
    model: Arc<Health>,
    breaker: CircuitBreaker,
    passive: PassiveHealth,
    /// The endpoint's verdict is still to come.
    link_pending: bool,
    done: bool,
    /// The try's trace span, which lasts as long as the try.
    pub(super) span: TrySpan,
}

impl InFlight {
    pub(super) fn start(
        provider: Arc<ProviderHealth>,
        model: Arc<Health>,
        route: &RouteConfig,
        passive: &PassiveHealth,
        span: TrySpan,
    ) -> Self {
        provider.start(Instant::now());
        provider.link.begin();
        model.begin();
        Self {
            provider,
            model,
            breaker: route.circuit_breaker.clone(),
            passive: passive.clone(),
            link_pending: true,
            done: false,
            span,
        }
    }

    /// Response headers arrived: the endpoint works, whatever they say.
    fn connected(&mut self, latency: Duration) {
        self.link_pending = false;
        self.provider.link.settle(
            Instant::now(),
            Outcome::Success,
            Some(latency),
            &self.breaker,
            &self.passive,
        );
    }

    /// The connection failed: the endpoint's failure, no verdict on the model.
    fn link_failed(mut self) {
        self.done = true;
        self.link_pending = false;
        self.provider.link.settle(
            Instant::now(),
            Outcome::Failure,
            None,
            &self.breaker,
            &self.passive,
        );
        self.model.release();
        self.provider.end();
    }

    /// How the model did.
    pub(super) fn finish(mut self, outcome: Outcome, latency: Option<Duration>) {
        self.done = true;
        if self.link_pending {
            self.provider.link.release();
        }
        self.model.settle(
            Instant::now(),
            outcome,
            latency,
            &self.breaker,
            &self.passive,
        );
        self.provider.end();
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.done {
            // Abandoned: a provider that clients keep giving up on must not count as
            // healthy (nor close a half-open breaker), and one that a stopping replica
            // cuts off did nothing wrong.
            if self.link_pending {
                self.provider.link.release();
            }
            self.model.release();
            self.provider.end();
        }
    }
}

/// One try of `target`: sends the request and reads the answer (or, for a stream, its
/// first token), classifying what went wrong.
pub(super) async fn attempt(
    gw: &Arc<Gateway>,
    table: &Arc<RoutingTable>,
    route: &RouteEntry,
    target: &TargetConfig,
    req: &ClientRequest,
    deadline: Instant,
    tried: &[String],
) -> Tried {
    // With tracing off, not even the provider is looked up for it.
    let span = if gw.tracing.is_on()
        && let Some(provider) = table.provider(&target.provider)
    {
        gw.tracing.try_span(
            &req.trace,
            req.op,
            &provider.config,
            target,
            &route.config.model,
            false,
        )
    } else {
        TrySpan::default()
    };
    let tried = try_target(gw, table, route, target, req, deadline, tried, &span).await;
    match &tried {
        Tried::Answer(..) => {}
        Tried::Retry(retry) => span.failed(retry.kind, &retry.why),
        Tried::Final(resp) => span.failed(resp.status().as_str(), ""),
        Tried::ContextLength(_) => span.failed("context_length", ""),
        Tried::ContentPolicy(_) => span.failed("content_policy", ""),
    }
    tried
}

#[allow(clippy::too_many_arguments)]
async fn try_target(
    gw: &Arc<Gateway>,
    table: &Arc<RoutingTable>,
    route: &RouteEntry,
    target: &TargetConfig,
    req: &ClientRequest,
    deadline: Instant,
    tried: &[String],
    span: &TrySpan,
) -> Tried {
    let Some(provider) = table.provider(&target.provider) else {
        return Tried::retry(
            "vanished",
            format!(
                "provider {} vanished from the configuration",
                target.provider
            ),
        );
    };
    let Some(model) = route.health_of(target).cloned() else {
        return Tried::retry(
            "vanished",
            format!("{} is not a target of this route", target.provider),
        );
    };
    let name = provider.config.name.as_str();
    let dialect = provider.dialect();
    let upstream = match build_request(
        provider.upstream(),
        target,
        req.op,
        &req.body,
        &req.request_id,
    ) {
        Ok(r) => r,
        Err(e) => return Tried::retry("invalid_request", format!("{name}: {e}")),
    };
    let rc = &route.config;
    let remaining = deadline.saturating_duration_since(Instant::now());
    let streaming = req.stream && req.op == Operation::ChatCompletions;
    // A stream's first token is due `firstToken` after sending (when set), and its
    // headers cannot come later than that.
    let first_token = rc
        .timeouts
        .first_token
        .filter(|_| streaming)
        .map(|t| t.get().min(remaining));
    let mut first_byte = rc.timeouts.first_byte.get().min(remaining);
    if let Some(t) = first_token {
        first_byte = first_byte.min(t);
    }
    let Sent {
        resp,
        inflight,
        latency,
        t0,
    } = match send(gw, provider, model, rc, upstream, first_byte, span).await {
        Ok(sent) => sent,
        Err(SendError::TimedOut) => {
            let why = format!(
                "{name} sent no response headers within {}",
                crds::Duration::new(first_byte)
            );
            return if rc.retry.retry_on.first_byte_timeout {
                Tried::elsewhere("timeout", why)
            } else {
                Tried::Final(GatewayError::UpstreamTimeout(why).response())
            };
        }
        Err(SendError::Connect(e)) => {
            let why = format!("{name}: {e}");
            return if rc.retry.retry_on.connect_error {
                Tried::retry("connect_error", why)
            } else {
                Tried::Final(GatewayError::UpstreamConnect(why).response())
            };
        }
    };
    let status = resp.status();
    provider
        .health
        .report_rate_limits(dialect.rate_limits(resp.headers()));

    if status.is_success() {
        if streaming {
            // Only a stream can break after its first byte, so only a stream carries what
            // it needs to resume elsewhere.
            let resume = Resume {
                gw: gw.clone(),
                table: table.clone(),
                route_model: route.config.model.clone(),
                tried: tried.to_vec(),
                deadline,
                body: req.body.clone(),
                request_id: req.request_id.clone(),
                include_usage: req.include_usage,
                client: req.client.clone(),
                trace: req.trace.clone(),
            };
            let source = Source {
                provider: name.to_owned(),
                reader: SseReader::new(resp.into_body(), gw.budget.clone()),
                decoder: dialect.stream_decoder(req.include_usage),
                inflight,
                latency,
            };
            let token_due = first_token.unwrap_or(first_byte);
            return stream(
                gw,
                rc,
                req,
                source,
                token_due.saturating_sub(latency),
                resume,
            )
            .await;
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        let declared = declared_length(resp.headers());
        let limits = ReadLimits {
            max: MAX_UPSTREAM_BODY,
            copies: 1,
            timeout: remaining,
        };
        let (body, held) = match read_body(&gw.budget, resp.into_body(), declared, limits).await {
            Ok(read) => read,
            Err(ReadError::OverBudget(e)) => {
                // The gateway's own limit, not the provider's fault.
                inflight.finish(Outcome::Success, Some(latency));
                gw.metrics
                    .attempt(name, "over_budget", Some(latency.as_secs_f64()));
                return Tried::Final(over_budget(gw, "upstream_answer", &e).response());
            }
            Err(ReadError::TimedOut(_)) => {
                inflight.finish(Outcome::Failure, Some(latency));
                gw.metrics
                    .attempt(name, "timeout", Some(latency.as_secs_f64()));
                return Tried::elsewhere(
                    "timeout",
                    format!("{name}: the response body did not finish in time"),
                );
            }
            Err(e) => {
                inflight.finish(Outcome::Failure, Some(latency));
                gw.metrics
                    .attempt(name, "body_error", Some(latency.as_secs_f64()));
                return Tried::retry("body_error", format!("{name}: the response body: {e}"));
            }
        };
        let answer = match dialect.answer(body) {
            Ok(answer) => answer,
            Err(e) => {
                inflight.finish(Outcome::Failure, Some(latency));
                gw.metrics
                    .attempt(name, "malformed", Some(latency.as_secs_f64()));
                return Tried::retry("malformed", format!("{name}: {e}"));
            }
        };
        provider
            .health
            .record_tokens(Instant::now(), answer.usage.total);
        gw.metrics
            .tokens(&rc.model, name, &req.client, answer.usage);
        span.answered(&req.trace, Some(answer.usage));
        inflight.finish(Outcome::Success, Some(latency));
        if answer.refusal {
            gw.metrics
                .attempt(name, "content_policy", Some(latency.as_secs_f64()));
            return Tried::ContentPolicy(json_response(status, answer.body));
        }
        gw.metrics
            .provider_success(provider.metrics(&gw.metrics), latency.as_secs_f64());
        let resp = json_response(status, answer.body).map(|b| HeldBody::wrap(b, held));
        return Tried::Answer(resp, t0.elapsed());
    }

    let headers = resp.headers().clone();
    let remaining = deadline
        .saturating_duration_since(Instant::now())
        .min(Duration::from_secs(10));
    let declared = declared_length(&headers);
    let limits = ReadLimits {
        max: 1 << 20,
        copies: 1,
        timeout: remaining,
    };
    let body = read_body(&gw.budget, resp.into_body(), declared, limits)
        .await
        .map(|(bytes, _)| bytes)
        .unwrap_or_default();
    let error = dialect.error(status.as_u16(), &body);
    let code = error.status;
    let status = StatusCode::from_u16(code).unwrap_or(status);
    let passthrough = || json_response(status, Bytes::from(error.body.to_string()));
    let retryable = rc
        .retry
        .retry_on
        .status_codes
        .iter()
        .any(|c| *c == i32::from(code));
    let seconds = Some(latency.as_secs_f64());
    match error.class {
        ErrorClass::RateLimited => {
            let wait = dialect
                .retry_after(&headers)
                .unwrap_or(Duration::from_secs(1));
            inflight.finish(Outcome::RateLimited(wait), Some(latency));
            gw.metrics.attempt(name, "rate_limited", seconds);
            let why = format!("{name} is rate limited for {}", crds::Duration::new(wait));
            return if retryable {
                Tried::Retry(Retry {
                    why,
                    kind: "rate_limited",
                    again: Again::After(wait),
                })
            } else {
                Tried::Final(passthrough())
            };
        }
        ErrorClass::ContextLength => {
            inflight.finish(Outcome::Success, Some(latency));
            gw.metrics.attempt(name, "context_length", seconds);
            return Tried::ContextLength(passthrough());
        }
        ErrorClass::ContentPolicy => {
            inflight.finish(Outcome::Success, Some(latency));
            gw.metrics.attempt(name, "content_policy", seconds);
            return Tried::ContentPolicy(passthrough());
        }
        ErrorClass::Server => {
            inflight.finish(Outcome::Failure, Some(latency));
            gw.metrics.attempt(name, "server_error", seconds);
        }
        ErrorClass::Client => {
            // The client's fault, not the provider's.
            inflight.finish(Outcome::Success, Some(latency));
            gw.metrics.attempt(name, "client_error", seconds);
        }
    }
    if retryable {
        let said = error
            .message()
            .map(|m| format!(" ({m})"))
            .unwrap_or_default();
        let kind = if error.class == ErrorClass::Server {
            "server_error"
        } else {
            "client_error"
        };
        Tried::retry(kind, format!("{name} answered {code}{said}"))
    } else {
        Tried::Final(passthrough())
    }
}

fn describe_client_error(e: &hyper_util::client::legacy::Error) -> String {
    use std::error::Error;
    let mut text = if e.is_connect() {
        "cannot connect".to_owned()
    } else {
        "the connection failed before a response".to_owned()
    };
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
