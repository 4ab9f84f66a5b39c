//! A stream: fail over invisibly until the first token; afterwards forward chunks, and
//! when the provider breaks mid-answer, resume on another target that can continue it,
//! or end with an explicit error event (never `[DONE]` after a truncated answer).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use crds::RouteConfig;
use http_body_util::{BodyExt, StreamBody};
use hyper::Response;
use hyper::body::Frame;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::ClientRequest;
use super::attempt::{InFlight, Tried, send};
use crate::body::RequestBody;
use crate::dialect::{Chunk, Facts, Operation, Prefill, Step, StreamDecoder, Usage, build_request};
use crate::gateway::Gateway;
use crate::health::Outcome;
use crate::otel::RequestSpan;
use crate::response::event_stream;
use crate::select::pick;
use crate::sse::{SseReader, StreamError};
use crate::table::RoutingTable;

/// What a stream needs to resume elsewhere after its provider broke mid-answer.
pub(super) struct Resume {
    pub(super) gw: Arc<Gateway>,
    pub(super) table: Arc<RoutingTable>,
    pub(super) route_model: String,
    pub(super) tried: Vec<String>,
    pub(super) deadline: Instant,
    pub(super) body: RequestBody,
    pub(super) request_id: String,
    pub(super) include_usage: bool,
    /// Who asked (for the token metric).
    pub(super) client: String,
    /// The request's trace span, which lasts until the stream ends.
    pub(super) trace: RequestSpan,
}

/// A stream: fail over invisibly until the first token; afterwards forward chunks, skip
/// malformed ones, resume elsewhere if the provider breaks, and otherwise end with an
/// explicit error event (never `[DONE]` after a truncated answer).
pub(super) async fn stream(
    gw: &Gateway,
    rc: &RouteConfig,
    req: &ClientRequest,
    source: Source,
    first_token_budget: Duration,
    resume: Resume,
) -> Tried {
    let stream_started = Instant::now();
    let Source {
        provider,
        mut reader,
        mut decoder,
        inflight,
        latency,
    } = source;
    let name = provider.as_str();
    // Comments and empty chunks do not count: the deadline is for a token.
    let first_by = Instant::now() + first_token_budget;
    // Chunks that carry no token yet (the opening role chunk) are held back, so a provider
    // that breaks before its first token is still failed over invisibly.
    let mut pending: VecDeque<Chunk> = VecDeque::new();
    let complete = loop {
        let next = reader.next(first_by).await;
        let timed_out = matches!(next, Err(StreamError::TimedOut));
        let why = match next {
            Ok(Some(data)) => match decoder.event(data) {
                Step::Chunks(chunks) => {
                    let token = chunks.iter().any(|c| c.facts().token);
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
            Err(StreamError::TimedOut) => match rc.timeouts.first_token {
                Some(t) => format!("sent no token within the first-token timeout ({t})"),
                None => format!(
                    "sent no token within the first-byte timeout ({})",
                    rc.timeouts.first_byte
                ),
            },
            Err(e) => e.to_string(),
        };
        inflight.finish(Outcome::Failure, Some(latency));
        gw.metrics
            .attempt(name, "stream_error", Some(latency.as_secs_f64()));
        let why = format!("{name}: {why} before the first token");
        return if timed_out {
            Tried::elsewhere("timeout", why)
        } else {
            Tried::retry("stream_error", why)
        };
    };
    gw.metrics
        .attempt(name, "success", Some(latency.as_secs_f64()));
    inflight.span.answered(&req.trace, None);
    let upstream_time = stream_started.elapsed() + latency;
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(32);
    let idle = rc.timeouts.stream_idle.get();
    let total = rc.timeouts.total;
    let include_usage = req.include_usage;
    let mut stopping = gw.stopping.subscribe();
    tokio::spawn(async move {
        let mut state = StreamState::default();
        // Only tokens are progress; the request's total timeout bounds the whole answer.
        let mut idle_by = Instant::now() + idle;
        let (mut reader, mut decoder, mut inflight, mut latency, mut provider) =
            (reader, decoder, inflight, latency, provider);
        let mut complete = complete;
        let mut tried: Vec<(String, String)> = resume
            .tried
            .iter()
            .map(|p| (resume.route_model.clone(), p.clone()))
            .collect();
        let mut resumed = 0;
        let broke = |resumed: bool| {
            if let Some(route) = resume.table.route_for(&resume.route_model) {
                route.metrics(&resume.gw.metrics).stream_break(resumed);
            }
        };
        loop {
            while let Some(mut chunk) = pending.pop_front() {
                // Chunks pass as the provider wrote them, except a continuation's first
                // ones, which must not restart the message or repeat its whitespace.
                if state.continuing && chunk.facts().role {
                    chunk.rewrite(strip_role);
                }
                if state.trim_leading && !chunk.facts().content.is_empty() {
                    let mut trimming = true;
                    chunk.rewrite(|v| trim_leading(v, &mut trimming));
                    state.trim_leading = trimming;
                }
                state.observe(chunk.facts());
                if chunk.facts().token {
                    idle_by = Instant::now() + idle;
                }
                if tx.send(Ok(event(chunk.json()))).await.is_err() {
                    // The client went away; the provider did nothing wrong.
                    return;
                }
            }
            if complete {
                let _ = tx
                    .send(Ok(Frame::data(Bytes::from_static(b"data: [DONE]\n\n"))))
                    .await;
                let used = state.tokens_used();
                inflight.provider.record_tokens(Instant::now(), used.total);
                resume
                    .gw
                    .metrics
                    .tokens(&resume.route_model, &provider, &resume.client, used);
                inflight.span.answered(&resume.trace, Some(used));
                inflight.finish(Outcome::Success, Some(latency));
                return;
            }
            let until = idle_by.min(resume.deadline);
            let next = tokio::select! {
                next = reader.next(until) => next,
                () = stop_requested(&mut stopping) => {
                    // Not the provider's doing: the replica is at its drain deadline.
                    resume.trace.interrupted();
                    drop(inflight);
                    broke(false);
                    interrupted(&tx, &provider, "the gateway replica serving this stream is shutting down").await;
                    return;
                }
            };
            let why = match next {
                Ok(Some(data)) => match decoder.event(data) {
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
                    inflight.span.failed(
                        "stream_broken",
                        "the request's total timeout ran out mid-answer",
                    );
                    resume.trace.interrupted();
                    inflight.finish(Outcome::Failure, Some(latency));
                    resume.gw.metrics.attempt(&provider, "stream_broken", None);
                    broke(false);
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
            inflight.span.failed("stream_broken", &why);
            inflight.finish(Outcome::Failure, Some(latency));
            resume.gw.metrics.attempt(&provider, "stream_broken", None);
            if resumed < 2
                && !state.text.is_empty()
                && let Some(next) = continue_elsewhere(&resume, &state.text, &mut tried).await
            {
                tracing::info!(from = %provider, to = %next.source.provider, why = %why, "resuming a broken stream on another provider");
                state.trim_leading =
                    next.trimmed_prefill && state.text.ends_with(char::is_whitespace);
                let Source {
                    provider: p,
                    reader: r,
                    decoder: d,
                    inflight: i,
                    latency: l,
                } = next.source;
                (reader, decoder, inflight, latency, provider) = (r, d, i, l, p);
                resumed += 1;
                broke(true);
                state.continuing = true;
                idle_by = Instant::now() + idle;
                continue;
            }
            // The original failure stands; a continuation target's own refusal is never
            // what the client sees.
            resume.trace.interrupted();
            broke(false);
            interrupted(&tx, &provider, &why).await;
            return;
        }
    });
    let mut resp = Response::new(StreamBody::new(receiver_stream(rx)).boxed());
    event_stream(&mut resp);
    Tried::Answer(resp, upstream_time)
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

/// Where a stream's chunks come from: one provider's response.
pub(super) struct Source {
    /// The provider's name.
    pub(super) provider: String,
    pub(super) reader: SseReader,
    pub(super) decoder: Box<dyn StreamDecoder>,
    pub(super) inflight: InFlight,
    /// Time to its response headers.
    pub(super) latency: Duration,
}

/// A continuation of a broken stream on another provider.
struct Continuation {
    /// The prefill was sent without its trailing whitespace (the dialect refuses it).
    trimmed_prefill: bool,
    source: Source,
}

/// Asks another target to continue `prefix`: of the route first, then of each of its
/// fallback models in order; returns its stream once its response headers arrived.
/// Targets that refuse or fail are skipped silently. `tried` holds the routes' targets
/// tried so far in this request, as (model, provider).
async fn continue_elsewhere(
    r: &Resume,
    prefix: &str,
    tried: &mut Vec<(String, String)>,
) -> Option<Continuation> {
    let first = r.table.route_for(&r.route_model)?;
    if !first.budget.try_retry(Instant::now(), &first.config.retry) {
        return None;
    }
    let fallbacks = first.config.fallbacks.iter().filter_map(|model| {
        r.table
            .route_for(model)
            .filter(|route| &route.config.model == model)
    });
    for route in std::iter::once(first).chain(fallbacks) {
        if let Some(next) = continue_on(r, route, prefix, tried).await {
            return Some(next);
        }
    }
    None
}

/// `continue_elsewhere` on one route.
async fn continue_on(
    r: &Resume,
    route: &crate::table::RouteEntry,
    prefix: &str,
    tried: &mut Vec<(String, String)>,
) -> Option<Continuation> {
    let rc = &route.config;
    loop {
        let now = Instant::now();
        if now >= r.deadline {
            return None;
        }
        let here: Vec<String> = tried
            .iter()
            .filter(|(model, _)| *model == rc.model)
            .map(|(_, provider)| provider.clone())
            .collect();
        let choice = pick(&r.table, route, &here, now)?;
        tried.push((rc.model.clone(), choice.target.provider.clone()));
        let provider = r.table.provider(&choice.target.provider)?;
        let Some(model) = route.health_of(choice.target).cloned() else {
            continue;
        };
        // Declared unable, or learned to be.
        if choice.target.no_continuation || model.refuses_prefill() {
            continue;
        }
        let dialect = provider.dialect();
        let Prefill::Continues {
            trims_whitespace,
            flags,
        } = dialect.prefill()
        else {
            continue;
        };
        let Ok(mut body) = r.body.to_value() else {
            return None;
        };
        let messages = body.get_mut("messages").and_then(Value::as_array_mut)?;
        messages.push(json!({"role": "assistant", "content": prefix}));
        if let Some(obj) = body.as_object_mut() {
            for (flag, value) in flags {
                obj.insert((*flag).into(), Value::Bool(*value));
            }
        }
        let Ok(body) = RequestBody::from_value(&body) else {
            return None;
        };
        let Ok(upstream) = build_request(
            provider.upstream(),
            choice.target,
            Operation::ChatCompletions,
            &body,
            &r.request_id,
        ) else {
            continue;
        };
        let first_byte = rc
            .timeouts
            .first_byte
            .get()
            .min(r.deadline.saturating_duration_since(now));
        let span = r.gw.tracing.try_span(
            &r.trace,
            Operation::ChatCompletions,
            &provider.config,
            choice.target,
            &rc.model,
            true,
        );
        let Ok(sent) = send(
            &r.gw,
            provider,
            model.clone(),
            rc,
            upstream,
            first_byte,
            &span,
        )
        .await
        else {
            span.failed("continuation_failed", "no response headers");
            continue;
        };
        let status = sent.resp.status();
        if matches!(status.as_u16(), 400 | 422) && model.learn_refuses_prefill() {
            // The request it refused differs from one it would take only by the prefill.
            tracing::warn!(
                provider = %provider.config.name,
                model = choice.target.upstream_model.as_deref().unwrap_or(&rc.model),
                status = status.as_u16(),
                "refused to continue a partial answer; it will not be asked again (declare continuation: none for this model to skip the try)"
            );
        }
        if !status.is_success() {
            let outcome = if status.is_server_error() {
                Outcome::Failure
            } else {
                Outcome::Success
            };
            span.failed(status.as_str(), "refused to continue the partial answer");
            sent.inflight.finish(outcome, Some(sent.latency));
            continue;
        }
        r.gw.metrics.attempt(
            &provider.config.name,
            "continuation",
            Some(sent.latency.as_secs_f64()),
        );
        return Some(Continuation {
            trimmed_prefill: trims_whitespace,
            source: Source {
                provider: provider.config.name.clone(),
                reader: SseReader::new(sent.resp.into_body(), r.gw.budget.clone()),
                decoder: dialect.stream_decoder(r.include_usage),
                inflight: sent.inflight,
                latency: sent.latency,
            },
        });
    }
}

/// Resolves once the drain deadline nears (never, if the gateway is gone).
async fn stop_requested(stopping: &mut tokio::sync::watch::Receiver<bool>) {
    if stopping.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// One server-sent event carrying `json`.
fn event(json: &str) -> Frame<Bytes> {
    let mut out = Vec::with_capacity(json.len() + 8);
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(json.as_bytes());
    out.extend_from_slice(b"\n\n");
    Frame::data(Bytes::from(out))
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
    let _ = tx.send(Ok(event(&body.to_string()))).await;
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
    /// What the provider's `usage` said, when it did.
    usage: Option<Usage>,
    /// The latest `id` and `model` seen, as JSON text.
    id: Option<String>,
    model: Option<String>,
    completion_chars: usize,
}

impl StreamState {
    fn observe(&mut self, facts: &Facts) {
        // Usually the same in every chunk: copied only when it changes.
        if facts.id.is_some() && facts.id != self.id {
            self.id.clone_from(&facts.id);
        }
        if facts.model.is_some() && facts.model != self.model {
            self.model.clone_from(&facts.model);
        }
        if let Some(usage) = facts.usage {
            self.usage_seen = true;
            self.usage = Some(usage);
        }
        self.finished |= facts.finished;
        let text = &facts.content;
        self.completion_chars += text.len();
        if self.text.len() + text.len() <= 1 << 20 {
            self.text.push_str(text);
        }
    }

    /// Tokens the answer used: as reported, or its output estimated from what was
    /// streamed.
    fn tokens_used(&self) -> Usage {
        match self.usage {
            Some(u) if u.total > 0 || u.output > 0 => u,
            _ => {
                let output = u64::try_from(self.completion_chars.div_ceil(4)).unwrap_or(0);
                Usage {
                    input: 0,
                    output,
                    total: output,
                }
            }
        }
    }

    /// A usage chunk estimated from what was streamed (about four characters a token).
    fn synthetic_usage(&self) -> Chunk {
        let completion = self.completion_chars.div_ceil(4);
        let seen = |json: &Option<String>| {
            json.as_deref()
                .and_then(|j| serde_json::from_str::<Value>(j).ok())
        };
        Chunk::built(
            &json!({"id": seen(&self.id), "object": "chat.completion.chunk", "model": seen(&self.model), "choices": [],
               "usage": {"prompt_tokens": 0, "completion_tokens": completion, "total_tokens": completion}}),
        )
    }
}

fn receiver_stream<T>(mut rx: mpsc::Receiver<T>) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
