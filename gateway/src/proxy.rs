//! Serving one client request: choose a target, try it, and on a transient failure try
//! another — on the same request — until one answers, the policy's limits are reached,
//! or nothing can serve.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use crds::policy::CircuitBreaker;
use crds::pool::PassiveHealth;
use crds::{RouteConfig, TargetConfig};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Response, StatusCode};
use rand::Rng;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::body::RequestBody;
use crate::budget::{HeldBody, ReadError, ReadLimits, declared_length, read_body};
use crate::errors::{error_response, json_response};
use crate::gateway::Gateway;
use crate::health::{Outcome, ProviderHealth};
use crate::retry::backoff_delay;
use crate::select::pick;
use crate::server::{Body, over_budget};
use crate::sse::{SseReader, StreamError};
use crate::table::{RouteEntry, RoutingTable};
use crate::upstream::{self, Operation, Step, StreamDecoder, build_request, retry_after};

/// Largest upstream error or non-streamed body read.
const MAX_UPSTREAM_BODY: usize = 64 << 20;

/// How long the serving provider took, to its first token for a stream or its whole
/// body otherwise; the rest of the request's time is what the gateway added.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamTime(pub Duration);

/// A validated client request.
#[derive(Debug)]
pub struct ClientRequest {
    /// Which operation.
    pub op: Operation,
    /// The JSON body, replayed on every try.
    pub body: RequestBody,
    /// The public model asked for.
    pub model: String,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// Whether the client asked for usage in the stream.
    pub include_usage: bool,
    /// Request id, propagated upstream and returned.
    pub request_id: String,
}

/// What a stream needs to resume elsewhere after its provider broke mid-answer.
struct Resume {
    gw: Arc<Gateway>,
    table: Arc<RoutingTable>,
    route_model: String,
    tried: Vec<String>,
    deadline: Instant,
    body: RequestBody,
    request_id: String,
    include_usage: bool,
}

/// How one try ended.
enum Tried {
    /// The answer for the client.
    Answer(Response<Body>),
    /// A transient failure; another target may do better.
    Retry(String),
    /// A failure another try cannot fix; passed to the client as is.
    Final(Response<Body>),
    /// The prompt does not fit the model.
    ContextLength(Response<Body>),
    /// The provider refused on content-policy grounds.
    ContentPolicy(Response<Body>),
}

/// Serves `req` with the current table.
pub async fn serve(
    gw: &Arc<Gateway>,
    table: Arc<RoutingTable>,
    first: &RouteEntry,
    req: ClientRequest,
) -> Response<Body> {
    let started = Instant::now();
    let deadline = started + first.config.timeouts.total.get();
    first.budget.record_request(started);

    let mut route = first;
    let mut visited = vec![route.config.model.clone()];
    let mut fallbacks: VecDeque<String> = first.config.fallbacks.iter().cloned().collect();
    let mut tries = 0u32;
    let mut first_provider: Option<String> = None;
    let mut last_failure = String::from("no provider could be tried");

    'routes: loop {
        let mut tried: Vec<String> = Vec::new();
        let attempts = u32::try_from(route.config.retry.attempts)
            .unwrap_or(1)
            .max(1);
        let mut redirect: Option<String> = None;
        for retry_no in 0..attempts {
            let now = Instant::now();
            if now >= deadline {
                last_failure = format!(
                    "the request's total timeout ({}) ran out",
                    route.config.timeouts.total
                );
                break 'routes;
            }
            let Some(choice) = pick(&table, route, &tried, now) else {
                break;
            };
            if tries > 0 {
                if !route.budget.try_retry(now, &route.config.retry) {
                    last_failure = format!(
                        "{last_failure}; the retry budget is spent, so no further tries were made"
                    );
                    break 'routes;
                }
                // Failing over to a different, usable target is immediate: that is the
                // rescue. Backoff applies when the only choice left is one already known
                // to be unwell, so a struggling provider is not hammered.
                if retry_no > 0 && choice.least_bad {
                    let unit: f64 = rand::rng().random();
                    let wait = backoff_delay(&route.config.retry.backoff, retry_no, unit);
                    tokio::time::sleep(wait.min(deadline.saturating_duration_since(now))).await;
                }
            }
            if choice.least_bad {
                tracing::info!(request_id = %req.request_id, provider = %choice.target.provider, "no usable provider; trying the one that recovers soonest");
            }
            tries += 1;
            tried.push(choice.target.provider.clone());
            first_provider.get_or_insert_with(|| choice.target.provider.clone());
            let served_by = choice.target.provider.clone();
            let done = |mut resp: Response<Body>| {
                decorate(&mut resp, &table, &served_by, tries, &req.request_id);
                resp
            };
            match attempt(gw, &table, route, choice.target, &req, deadline, &tried).await {
                Tried::Answer(resp) => {
                    if first_provider.as_deref() != Some(served_by.as_str()) {
                        gw.metrics.failover(&first.config.model);
                    }
                    return done(resp);
                }
                Tried::Retry(why) => last_failure = why,
                Tried::Final(resp) => return done(resp),
                Tried::ContextLength(resp) => match &route.config.on_context_length_exceeded {
                    Some(model) if !visited.contains(model) => {
                        redirect = Some(model.clone());
                        break;
                    }
                    _ => return done(resp),
                },
                Tried::ContentPolicy(resp) => match &route.config.on_content_policy {
                    Some(action) if action.response.is_some() => {
                        let text = action.response.as_deref().unwrap_or_default();
                        return done(synthetic_answer(&req, text, StatusCode::OK));
                    }
                    Some(action) if action.model.as_ref().is_some_and(|m| !visited.contains(m)) => {
                        redirect = action.model.clone();
                        break;
                    }
                    _ => return done(resp),
                },
            }
        }
        let next = redirect.or_else(|| {
            while let Some(model) = fallbacks.pop_front() {
                if !visited.contains(&model) {
                    return Some(model);
                }
            }
            None
        });
        let Some(next) = next.and_then(|m| table.route_for(&m).filter(|r| r.config.model == m))
        else {
            break;
        };
        visited.push(next.config.model.clone());
        route = next;
    }

    if let Some(degraded) = &first.config.degraded_response {
        let status = StatusCode::from_u16(u16::try_from(degraded.status).unwrap_or(503))
            .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        let mut resp = if status.is_success() {
            synthetic_answer(&req, &degraded.message, status)
        } else {
            error_response(status, "server_error", "degraded", &degraded.message)
        };
        decorate(&mut resp, &table, "", tries, &req.request_id);
        return resp;
    }
    let mut resp = error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        "no_provider_available",
        &format!(
            "no provider could serve model {:?} after {tries} tries: {last_failure}",
            req.model
        ),
    );
    decorate(&mut resp, &table, "", tries, &req.request_id);
    resp
}

/// Response headers naming who served.
fn decorate(
    resp: &mut Response<Body>,
    table: &RoutingTable,
    provider: &str,
    tries: u32,
    request_id: &str,
) {
    let h = resp.headers_mut();
    let mut set = |name: &'static str, value: &str| {
        if let Ok(v) = hyper::header::HeaderValue::from_str(value) {
            h.insert(name, v);
        }
    };
    set("x-request-id", request_id);
    set("x-switchyard-attempts", &tries.to_string());
    if let Some(p) = table.provider(provider) {
        set("x-switchyard-provider", provider);
        set("x-switchyard-provider-region", &p.config.region);
    }
    set("x-switchyard-region", &table.config.region);
}

/// Records a started request's outcome exactly once; a request abandoned by the client
/// counts as neither success nor failure of the provider.
struct InFlight {
    health: Arc<ProviderHealth>,
    breaker: CircuitBreaker,
    passive: PassiveHealth,
    done: bool,
}

impl InFlight {
    fn start(health: Arc<ProviderHealth>, route: &RouteConfig, passive: &PassiveHealth) -> Self {
        health.start(Instant::now());
        Self {
            health,
            breaker: route.circuit_breaker.clone(),
            passive: passive.clone(),
            done: false,
        }
    }

    fn finish(mut self, outcome: Outcome, latency: Option<Duration>) {
        self.done = true;
        self.health.finish(
            Instant::now(),
            outcome,
            latency,
            &self.breaker,
            &self.passive,
        );
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.done {
            self.health.finish(
                Instant::now(),
                Outcome::Success,
                None,
                &self.breaker,
                &self.passive,
            );
        }
    }
}

async fn attempt(
    gw: &Arc<Gateway>,
    table: &Arc<RoutingTable>,
    route: &RouteEntry,
    target: &TargetConfig,
    req: &ClientRequest,
    deadline: Instant,
    tried: &[String],
) -> Tried {
    let Some(provider) = table.provider(&target.provider) else {
        return Tried::Retry(format!(
            "provider {} vanished from the configuration",
            target.provider
        ));
    };
    let name = provider.config.name.as_str();
    let kind = provider.config.provider_type;
    let upstream = match build_request(provider, target, req.op, &req.body, &req.request_id) {
        Ok(r) => r,
        Err(e) => return Tried::Retry(format!("{name}: {e}")),
    };
    let rc = &route.config;
    let client = gw.client(rc.timeouts.connect.get());
    let first_byte = rc
        .timeouts
        .first_byte
        .get()
        .min(deadline.saturating_duration_since(Instant::now()));
    let inflight = InFlight::start(provider.health.clone(), rc, &provider.config.health.passive);
    let t0 = Instant::now();
    let resp = match tokio::time::timeout(first_byte, client.request(upstream)).await {
        Err(_) => {
            inflight.finish(Outcome::Failure, None);
            gw.metrics.attempt(name, "timeout", None);
            let why = format!(
                "{name} sent no response headers within {}",
                crds::Duration::new(first_byte)
            );
            return if rc.retry.retry_on.first_byte_timeout {
                Tried::Retry(why)
            } else {
                Tried::Final(error_response(
                    StatusCode::GATEWAY_TIMEOUT,
                    "server_error",
                    "upstream_timeout",
                    &why,
                ))
            };
        }
        Ok(Err(e)) => {
            inflight.finish(Outcome::Failure, None);
            gw.metrics.attempt(name, "connect_error", None);
            let why = format!("{name}: {}", describe_client_error(&e));
            return if rc.retry.retry_on.connect_error {
                Tried::Retry(why)
            } else {
                Tried::Final(error_response(
                    StatusCode::BAD_GATEWAY,
                    "server_error",
                    "upstream_connect_error",
                    &why,
                ))
            };
        }
        Ok(Ok(resp)) => resp,
    };
    let latency = t0.elapsed();
    let status = resp.status();
    provider
        .health
        .report_rate_limits(upstream::rate_limits(resp.headers()));

    if status.is_success() {
        if req.stream && req.op == Operation::ChatCompletions {
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
            };
            return stream(
                gw,
                rc,
                name,
                kind,
                resp,
                req,
                inflight,
                latency,
                first_byte.saturating_sub(latency),
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
                return Tried::Final(over_budget(gw, "upstream_answer", &e));
            }
            Err(ReadError::TimedOut(_)) => {
                inflight.finish(Outcome::Failure, Some(latency));
                gw.metrics
                    .attempt(name, "timeout", Some(latency.as_secs_f64()));
                return Tried::Retry(format!("{name}: the response body did not finish in time"));
            }
            Err(e) => {
                inflight.finish(Outcome::Failure, Some(latency));
                gw.metrics
                    .attempt(name, "body_error", Some(latency.as_secs_f64()));
                return Tried::Retry(format!("{name}: the response body: {e}"));
            }
        };
        let answer = match upstream::answer(kind, body) {
            Ok(answer) => answer,
            Err(e) => {
                inflight.finish(Outcome::Failure, Some(latency));
                gw.metrics
                    .attempt(name, "malformed", Some(latency.as_secs_f64()));
                return Tried::Retry(format!("{name}: {e}"));
            }
        };
        provider.health.record_tokens(Instant::now(), answer.tokens);
        inflight.finish(Outcome::Success, Some(latency));
        if answer.refusal {
            gw.metrics
                .attempt(name, "content_policy", Some(latency.as_secs_f64()));
            return Tried::ContentPolicy(json_response(status, answer.body));
        }
        gw.metrics
            .attempt(name, "success", Some(latency.as_secs_f64()));
        let mut resp = json_response(status, answer.body).map(|b| HeldBody::wrap(b, held));
        resp.extensions_mut().insert(UpstreamTime(t0.elapsed()));
        return Tried::Answer(resp);
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
    let (code, parsed) = upstream::error(kind, status.as_u16(), &body);
    let status = StatusCode::from_u16(code).unwrap_or(status);
    // A body that is not JSON reaches the client wrapped in an OpenAI error.
    let parsed = parsed.unwrap_or_else(|| json!({"error": {"message": String::from_utf8_lossy(&body), "type": "upstream_error", "code": code.to_string(), "param": null}}));
    let passthrough = || json_response(status, Bytes::from(parsed.to_string()));
    let retryable = rc
        .retry
        .retry_on
        .status_codes
        .iter()
        .any(|c| *c == i32::from(code));
    if code == 429 {
        let wait = retry_after(&headers);
        inflight.finish(Outcome::RateLimited(wait), Some(latency));
        gw.metrics
            .attempt(name, "rate_limited", Some(latency.as_secs_f64()));
        let why = format!("{name} is rate limited for {}", crds::Duration::new(wait));
        return if retryable {
            Tried::Retry(why)
        } else {
            Tried::Final(passthrough())
        };
    }
    let err_code = parsed
        .pointer("/error/code")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let message = parsed
        .pointer("/error/message")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_ascii_lowercase();
    if code == 400 || code == 413 {
        if err_code == "context_length_exceeded"
            || message.contains("maximum context length")
            || message.contains("prompt is too long")
        {
            inflight.finish(Outcome::Success, Some(latency));
            gw.metrics
                .attempt(name, "context_length", Some(latency.as_secs_f64()));
            return Tried::ContextLength(passthrough());
        }
        if matches!(err_code, "content_policy_violation" | "content_filter")
            || parsed
                .pointer("/error/innererror/code")
                .and_then(Value::as_str)
                == Some("ResponsibleAIPolicyViolation")
        {
            inflight.finish(Outcome::Success, Some(latency));
            gw.metrics
                .attempt(name, "content_policy", Some(latency.as_secs_f64()));
            return Tried::ContentPolicy(passthrough());
        }
    }
    if status.is_server_error() {
        inflight.finish(Outcome::Failure, Some(latency));
        gw.metrics
            .attempt(name, "server_error", Some(latency.as_secs_f64()));
    } else {
        // The client's fault, not the provider's.
        inflight.finish(Outcome::Success, Some(latency));
        gw.metrics
            .attempt(name, "client_error", Some(latency.as_secs_f64()));
    }
    if retryable {
        let said = parsed
            .pointer("/error/message")
            .and_then(Value::as_str)
            .map(|m| format!(" ({})", m.chars().take(200).collect::<String>()))
            .unwrap_or_default();
        Tried::Retry(format!("{name} answered {code}{said}"))
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

/// A stream: fail over invisibly until the first token; afterwards forward chunks, skip
/// malformed ones, resume elsewhere if the provider breaks, and otherwise end with an
/// explicit error event (never `[DONE]` after a truncated answer).
#[allow(clippy::too_many_arguments)]
async fn stream(
    gw: &Gateway,
    rc: &RouteConfig,
    name: &str,
    kind: crds::pool::ProviderType,
    resp: Response<Incoming>,
    req: &ClientRequest,
    inflight: InFlight,
    latency: Duration,
    first_token_budget: Duration,
    resume: Resume,
) -> Tried {
    let stream_started = Instant::now();
    let mut reader = SseReader::new(resp.into_body(), gw.budget.clone());
    let mut decoder = StreamDecoder::new(kind, req.include_usage);
    // Comments and empty chunks do not count: the deadline is for a token.
    let first_by = Instant::now() + first_token_budget;
    // Chunks that carry no token yet (the opening role chunk) are held back, so a provider
    // that breaks before its first token is still failed over invisibly.
    let mut pending: VecDeque<Value> = VecDeque::new();
    let complete = loop {
        let why = match reader.next(first_by).await {
            Ok(Some(data)) => match decoder.event(&data) {
                Step::Chunks(chunks) => {
                    let token = chunks.iter().any(carries_token);
                    pending.extend(chunks);
                    if token {
                        break false;
                    }
                    continue;
                }
                Step::Done(chunks) => {
                    pending.extend(chunks);
                    break true;
                }
                Step::Malformed => continue,
                Step::Failed(why) => why,
            },
            Ok(None) => "ended the stream".to_owned(),
            Err(StreamError::TimedOut) => format!(
                "sent no token within the first-byte timeout ({})",
                rc.timeouts.first_byte
            ),
            Err(e) => e.to_string(),
        };
        inflight.finish(Outcome::Failure, Some(latency));
        gw.metrics
            .attempt(name, "stream_error", Some(latency.as_secs_f64()));
        return Tried::Retry(format!("{name}: {why} before the first token"));
    };
    gw.metrics
        .attempt(name, "success", Some(latency.as_secs_f64()));
    let upstream_time = stream_started.elapsed() + latency;
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(32);
    let idle = rc.timeouts.stream_idle.get();
    let total = rc.timeouts.total;
    let include_usage = req.include_usage;
    let provider = name.to_owned();
    let mut stopping = gw.stopping.subscribe();
    tokio::spawn(async move {
        let mut state = StreamState::default();
        // Only tokens are progress; the request's total timeout bounds the whole answer.
        let mut idle_by = Instant::now() + idle;
        let (mut reader, mut decoder, mut inflight, mut latency, mut provider) =
            (reader, decoder, inflight, latency, provider);
        let mut complete = complete;
        let mut tried = resume.tried.clone();
        let mut resumed = 0;
        loop {
            while let Some(mut chunk) = pending.pop_front() {
                if state.continuing {
                    strip_role(&mut chunk);
                }
                if state.trim_leading {
                    trim_leading(&mut chunk, &mut state.trim_leading);
                }
                state.observe(&chunk);
                if carries_token(&chunk) {
                    idle_by = Instant::now() + idle;
                }
                if tx.send(Ok(event(&chunk))).await.is_err() {
                    // The client went away; the provider did nothing wrong.
                    return;
                }
            }
            if complete {
                let _ = tx
                    .send(Ok(Frame::data(Bytes::from_static(b"data: [DONE]\n\n"))))
                    .await;
                inflight
                    .health
                    .record_tokens(Instant::now(), state.tokens_used());
                inflight.finish(Outcome::Success, Some(latency));
                return;
            }
            let until = idle_by.min(resume.deadline);
            let next = tokio::select! {
                next = reader.next(until) => next,
                () = stop_requested(&mut stopping) => {
                    // Not the provider's doing: the replica is at its drain deadline.
                    drop(inflight);
                    interrupted(&tx, &provider, "the gateway replica serving this stream is shutting down").await;
                    return;
                }
            };
            let why = match next {
                Ok(Some(data)) => match decoder.event(&data) {
                    Step::Chunks(chunks) => {
                        pending.extend(chunks);
                        continue;
                    }
                    Step::Done(chunks) => {
                        pending.extend(chunks);
                        complete = true;
                        continue;
                    }
                    Step::Malformed => {
                        tracing::warn!(provider = %provider, "skipped a malformed stream chunk");
                        continue;
                    }
                    Step::Failed(why) => why,
                },
                Ok(None) if state.finished => {
                    // The answer is whole but the stream ended without its closing
                    // event: finalise at once, with usage.
                    if include_usage && !state.usage_seen {
                        let usage = decoder
                            .reported_usage()
                            .unwrap_or_else(|| state.synthetic_usage());
                        pending.push_back(usage);
                    }
                    complete = true;
                    continue;
                }
                Ok(None) => {
                    "the provider ended the stream before the answer was complete".to_owned()
                }
                Err(StreamError::TimedOut) if Instant::now() >= resume.deadline => {
                    // No time is left to resume anywhere.
                    inflight.finish(Outcome::Failure, Some(latency));
                    let why = format!("the request's total timeout ({total}) ran out mid-answer");
                    interrupted(&tx, &provider, &why).await;
                    return;
                }
                Err(StreamError::TimedOut) => format!(
                    "the provider sent no token for {} mid-answer",
                    crds::Duration::new(idle)
                ),
                Err(other) => other.to_string(),
            };
            inflight.finish(Outcome::Failure, Some(latency));
            if resumed < 2
                && !state.text.is_empty()
                && let Some(next) = continue_elsewhere(&resume, &state.text, &mut tried).await
            {
                tracing::info!(from = %provider, to = %next.provider, why = %why, "resuming a broken stream on another provider");
                state.trim_leading =
                    next.trimmed_prefill && state.text.ends_with(char::is_whitespace);
                (reader, decoder, inflight, latency, provider) = (
                    next.reader,
                    next.decoder,
                    next.inflight,
                    next.latency,
                    next.provider,
                );
                resumed += 1;
                state.continuing = true;
                idle_by = Instant::now() + idle;
                continue;
            }
            // The original failure stands; a continuation target's own refusal is never
            // what the client sees.
            interrupted(&tx, &provider, &why).await;
            return;
        }
    });
    let mut resp = Response::new(StreamBody::new(receiver_stream(rx)).boxed());
    let h = resp.headers_mut();
    h.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-cache"),
    );
    resp.extensions_mut().insert(UpstreamTime(upstream_time));
    Tried::Answer(resp)
}

/// Whether a chunk carries part of the answer (text, a tool call, the finish, usage or
/// an error) rather than only opening the message.
fn carries_token(chunk: &Value) -> bool {
    if chunk.get("usage").is_some_and(|u| !u.is_null()) || chunk.get("error").is_some() {
        return true;
    }
    chunk
        .get("choices")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|c| {
            c.get("finish_reason").is_some_and(|f| !f.is_null())
                || c.pointer("/delta/tool_calls").is_some()
                || c.pointer("/delta/content")
                    .and_then(Value::as_str)
                    .is_some_and(|t| !t.is_empty())
        })
}

/// Drops the whitespace a continuation repeats because its prefill had to be sent without
/// it, until the first visible character.
fn trim_leading(chunk: &mut Value, trimming: &mut bool) {
    for choice in chunk
        .get_mut("choices")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
    {
        if let Some(content) = choice.pointer_mut("/delta/content")
            && let Some(text) = content.as_str()
        {
            let rest = text.trim_start();
            if !rest.is_empty() {
                *trimming = false;
            }
            *content = Value::String(rest.to_owned());
        }
    }
}

/// A continuation's opening role chunk would restart the message.
fn strip_role(chunk: &mut Value) {
    for choice in chunk
        .get_mut("choices")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
    {
        if let Some(delta) = choice.get_mut("delta").and_then(Value::as_object_mut) {
            delta.remove("role");
        }
    }
}

/// Whether a provider continues an assistant message given as the last message (a
/// prefill). OpenAI and Azure OpenAI start a new answer instead, so they are never used
/// to resume a broken stream.
fn accepts_prefill(t: crds::pool::ProviderType) -> bool {
    matches!(
        t,
        crds::pool::ProviderType::OpenAiCompatible | crds::pool::ProviderType::Anthropic
    )
}

/// A continuation of a broken stream on another provider.
struct Continuation {
    /// The prefill was sent without its trailing whitespace (Anthropic refuses it).
    trimmed_prefill: bool,
    reader: SseReader,
    decoder: StreamDecoder,
    provider: String,
    inflight: InFlight,
    latency: Duration,
}

/// Asks another target of the route to continue `prefix`; returns its stream once its
/// response headers arrived. Targets that refuse or fail are skipped silently.
async fn continue_elsewhere(
    r: &Resume,
    prefix: &str,
    tried: &mut Vec<String>,
) -> Option<Continuation> {
    let route = r.table.route_for(&r.route_model)?;
    let rc = &route.config;
    if !route.budget.try_retry(Instant::now(), &rc.retry) {
        return None;
    }
    loop {
        let now = Instant::now();
        if now >= r.deadline {
            return None;
        }
        let choice = pick(&r.table, route, tried, now)?;
        tried.push(choice.target.provider.clone());
        let provider = r.table.provider(&choice.target.provider)?;
        if !accepts_prefill(provider.config.provider_type) {
            continue;
        }
        let Ok(mut body) = r.body.to_value() else {
            return None;
        };
        let messages = body.get_mut("messages").and_then(Value::as_array_mut)?;
        messages.push(json!({"role": "assistant", "content": prefix}));
        if provider.config.provider_type == crds::pool::ProviderType::OpenAiCompatible
            && let Some(obj) = body.as_object_mut()
        {
            // vLLM's and llama.cpp's way of saying "continue this message".
            obj.insert("continue_final_message".into(), Value::Bool(true));
            obj.insert("add_generation_prompt".into(), Value::Bool(false));
        }
        let Ok(body) = RequestBody::from_value(&body) else {
            return None;
        };
        let Ok(upstream) = build_request(
            provider,
            choice.target,
            Operation::ChatCompletions,
            &body,
            &r.request_id,
        ) else {
            continue;
        };
        let client = r.gw.client(rc.timeouts.connect.get());
        let first_byte = rc
            .timeouts
            .first_byte
            .get()
            .min(r.deadline.saturating_duration_since(now));
        let inflight =
            InFlight::start(provider.health.clone(), rc, &provider.config.health.passive);
        let t0 = Instant::now();
        match tokio::time::timeout(first_byte, client.request(upstream)).await {
            Ok(Ok(resp)) if resp.status().is_success() => {
                let latency = t0.elapsed();
                r.gw.metrics.attempt(
                    &provider.config.name,
                    "continuation",
                    Some(latency.as_secs_f64()),
                );
                return Some(Continuation {
                    trimmed_prefill: provider.config.provider_type
                        == crds::pool::ProviderType::Anthropic,
                    reader: SseReader::new(resp.into_body(), r.gw.budget.clone()),
                    decoder: StreamDecoder::new(provider.config.provider_type, r.include_usage),
                    provider: provider.config.name.clone(),
                    inflight,
                    latency,
                });
            }
            Ok(Ok(resp)) => {
                let outcome = if resp.status().is_server_error() {
                    Outcome::Failure
                } else {
                    Outcome::Success
                };
                inflight.finish(outcome, Some(t0.elapsed()));
            }
            _ => inflight.finish(Outcome::Failure, None),
        }
    }
}

/// Resolves once the drain deadline nears (never, if the gateway is gone).
async fn stop_requested(stopping: &mut tokio::sync::watch::Receiver<bool>) {
    if stopping.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn event(value: &Value) -> Frame<Bytes> {
    Frame::data(Bytes::from(format!("data: {value}\n\n")))
}

async fn interrupted(
    tx: &mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>,
    provider: &str,
    message: &str,
) {
    tracing::warn!(
        provider,
        message,
        "stream interrupted after the first token"
    );
    let body = json!({"error": {
        "message": format!("{message}; the answer is incomplete"),
        "type": "server_error",
        "code": "upstream_stream_interrupted",
        "param": null
    }});
    let _ = tx.send(Ok(event(&body))).await;
}

/// What the forwarded stream has shown so far.
#[derive(Debug, Default)]
struct StreamState {
    finished: bool,
    /// The answer so far, to resume from (bounded).
    text: String,
    /// Chunks now come from a continuation.
    continuing: bool,
    /// The continuation may repeat whitespace the answer already ends with.
    trim_leading: bool,
    usage_seen: bool,
    usage_total: Option<u64>,
    id: Option<Value>,
    model: Option<Value>,
    completion_chars: usize,
}

impl StreamState {
    fn observe(&mut self, chunk: &Value) {
        self.id = chunk.get("id").cloned().or(self.id.take());
        self.model = chunk.get("model").cloned().or(self.model.take());
        if let Some(usage) = chunk.get("usage").filter(|u| !u.is_null()) {
            self.usage_seen = true;
            self.usage_total = usage.get("total_tokens").and_then(Value::as_u64);
        }
        for choice in chunk
            .get("choices")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if choice.get("finish_reason").is_some_and(|f| !f.is_null()) {
                self.finished = true;
            }
            if let Some(text) = choice.pointer("/delta/content").and_then(Value::as_str) {
                self.completion_chars += text.len();
                if self.text.len() + text.len() <= 1 << 20 {
                    self.text.push_str(text);
                }
            }
        }
    }

    /// Tokens the answer used: as reported, or estimated from what was streamed.
    fn tokens_used(&self) -> u64 {
        self.usage_total
            .unwrap_or_else(|| u64::try_from(self.completion_chars.div_ceil(4)).unwrap_or(0))
    }

    /// A usage chunk estimated from what was streamed (about four characters a token).
    fn synthetic_usage(&self) -> Value {
        let completion = self.completion_chars.div_ceil(4);
        json!({"id": self.id, "object": "chat.completion.chunk", "model": self.model, "choices": [],
               "usage": {"prompt_tokens": 0, "completion_tokens": completion, "total_tokens": completion}})
    }
}

/// A complete answer the gateway makes up (content-policy response, degraded mode).
fn synthetic_answer(req: &ClientRequest, text: &str, status: StatusCode) -> Response<Body> {
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if req.stream {
        let chunk = json!({"id": "switchyard", "object": "chat.completion.chunk", "created": created, "model": req.model,
                           "choices": [{"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": "stop"}]});
        let mut body = format!("data: {chunk}\n\n");
        if req.include_usage {
            let usage = json!({"id": "switchyard", "object": "chat.completion.chunk", "created": created, "model": req.model,
                               "choices": [], "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}});
            body.push_str(&format!("data: {usage}\n\n"));
        }
        body.push_str("data: [DONE]\n\n");
        let mut resp = json_response(status, Bytes::from(body));
        resp.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("text/event-stream"),
        );
        return resp;
    }
    let body = json!({"id": "switchyard", "object": "chat.completion", "created": created, "model": req.model,
                      "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                      "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}});
    json_response(status, Bytes::from(body.to_string()))
}

fn receiver_stream<T>(mut rx: mpsc::Receiver<T>) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
