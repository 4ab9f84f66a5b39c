//! Anthropic's Messages API, spoken on behalf of OpenAI clients: chat-completion requests
//! become Messages requests, and Messages answers (whole or streamed) become chat
//! completions, so an application written against the OpenAI SDK cannot tell which
//! provider answered.
//!
//! Fields Anthropic has no equivalent for (`logprobs`, `seed`, penalties,
//! `response_format`, `stream_options`, …) are dropped rather than refused: the route chose
//! this provider, and a dropped tuning knob is better than a failed request. What cannot be
//! expressed at all (`n > 1`, audio input, non-function tools) makes this target skip the
//! request, naming the field, so another target can serve it.

use std::time::Duration;

use bytes::Bytes;
use crds::TargetConfig;
use crds::pool::AnthropicSettings;
use hyper::HeaderMap;
use hyper::header::{HeaderName, HeaderValue};
use serde_json::{Map, Value, json};

use super::{
    Address, Answer, Chunk, Dialect, Operation, Prefill, Step, StreamDecoder, Upstream,
    UpstreamError,
};
use crate::body::RequestBody;
use crate::health::RateLimitReport;

/// Anthropic's Messages API.
#[derive(Debug)]
pub struct Anthropic;

fn settings(up: Upstream<'_>) -> AnthropicSettings {
    up.provider.anthropic.clone().unwrap_or_default()
}

/// The key and the API version every Anthropic request carries.
fn auth(up: Upstream<'_>) -> Vec<(HeaderName, HeaderValue)> {
    let version = HeaderValue::from_str(&settings(up).version)
        .unwrap_or_else(|_| HeaderValue::from_static("2023-06-01"));
    up.key_header("x-api-key", "")
        .into_iter()
        .chain([(HeaderName::from_static("anthropic-version"), version)])
        .collect()
}

impl Dialect for Anthropic {
    fn address(
        &self,
        up: Upstream<'_>,
        _target: &TargetConfig,
        op: Operation,
    ) -> Result<Address, String> {
        match op {
            Operation::ChatCompletions => Ok(Address {
                url: format!("{}/v1/messages", up.endpoint()),
                headers: auth(up),
            }),
            Operation::Completions | Operation::Embeddings => Err(format!(
                "Anthropic serves chat completions only, not /v1/{}",
                op.suffix()
            )),
        }
    }

    fn body(&self, up: Upstream<'_>, body: &RequestBody, model: &str) -> Result<Bytes, String> {
        let translated = request(&body.to_value()?, model, &settings(up))?;
        serde_json::to_vec(&translated)
            .map(Bytes::from)
            .map_err(|e| e.to_string())
    }

    fn answer(&self, body: Bytes) -> Result<Answer, String> {
        let message: Value = serde_json::from_slice(&body)
            .map_err(|_| "the response body is not valid JSON".to_owned())?;
        let refusal = is_refusal(&message);
        let out = response(&message)?;
        Ok(Answer {
            usage: out.get("usage").map(super::Usage::of).unwrap_or_default(),
            body: Bytes::from(out.to_string()),
            refusal,
        })
    }

    fn error(&self, status: u16, body: &[u8]) -> UpstreamError {
        // Its 529 "overloaded" is what OpenAI clients and the retry policy know as 503.
        let status = if status == 529 { 503 } else { status };
        let body = match serde_json::from_slice::<Value>(body) {
            Ok(v) if v.get("type").and_then(Value::as_str) == Some("error") => error(&v),
            Ok(other) => other,
            Err(_) => super::wrap_non_json(status, body),
        };
        UpstreamError {
            status,
            class: super::openai_class(status, &body),
            body,
        }
    }

    fn stream_decoder(&self, include_usage: bool) -> Box<dyn StreamDecoder> {
        Box::new(StreamTranslator::new(include_usage))
    }

    fn prefill(&self) -> Prefill {
        Prefill::Continues {
            trims_whitespace: true,
            flags: &[],
        }
    }

    fn rate_limits(&self, headers: &HeaderMap) -> RateLimitReport {
        let [
            remaining_requests,
            remaining_tokens,
            limit_requests,
            limit_tokens,
        ] = super::numbers(
            headers,
            [
                "anthropic-ratelimit-requests-remaining",
                "anthropic-ratelimit-tokens-remaining",
                "anthropic-ratelimit-requests-limit",
                "anthropic-ratelimit-tokens-limit",
            ],
        );
        RateLimitReport {
            remaining_requests,
            remaining_tokens,
            limit_requests,
            limit_tokens,
        }
    }

    /// `retry-after`, else the latest of its `anthropic-ratelimit-*-reset` timestamps.
    fn retry_after(&self, headers: &HeaderMap) -> Option<Duration> {
        super::standard_retry_after(headers).or_else(|| {
            let now = k8s_openapi::jiff::Timestamp::now();
            [
                "anthropic-ratelimit-requests-reset",
                "anthropic-ratelimit-tokens-reset",
                "anthropic-ratelimit-input-tokens-reset",
                "anthropic-ratelimit-output-tokens-reset",
            ]
            .iter()
            .filter_map(|name| {
                super::text(headers, name)
                    .and_then(|v| v.parse::<k8s_openapi::jiff::Timestamp>().ok())
            })
            .filter_map(|at| Duration::try_from(at.duration_since(now)).ok())
            .map(|d| d.min(Duration::from_secs(3600)))
            .max()
        })
    }

    fn probe(&self, up: Upstream<'_>) -> Address {
        Address {
            url: format!("{}/v1/models", up.endpoint()),
            headers: auth(up),
        }
    }
}

impl StreamDecoder for StreamTranslator {
    fn event(&mut self, data: String) -> Step {
        StreamTranslator::event(self, &data)
    }

    fn reported_usage(&self) -> Option<Chunk> {
        Some(Chunk::built(&self.usage_chunk()))
    }
}

/// The Messages request for an OpenAI chat-completion request `body`, addressed to `model`.
pub fn request(body: &Value, model: &str, settings: &AnthropicSettings) -> Result<Value, String> {
    let obj = body
        .as_object()
        .ok_or_else(|| "the request body is not a JSON object".to_owned())?;
    if let Some(n) = obj.get("n").and_then(Value::as_u64)
        && n > 1
    {
        return Err(format!(
            "n: Anthropic returns one choice per request, not {n}"
        ));
    }
    let messages = obj
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| "messages: expected an array".to_owned())?;

    let mut system: Vec<String> = Vec::new();
    let mut turns: Vec<(&'static str, Vec<Value>)> = Vec::new();
    for (i, message) in messages.iter().enumerate() {
        let role = message.get("role").and_then(Value::as_str).unwrap_or("");
        let content = message.get("content").unwrap_or(&Value::Null);
        let field = |rest: &str| format!("messages[{i}]{rest}");
        let (role, blocks) = match role {
            "system" | "developer" => {
                for block in content_blocks(content, &field(".content"))? {
                    if let Some(text) = block.get("text").and_then(Value::as_str) {
                        system.push(text.to_owned());
                    }
                }
                continue;
            }
            "user" => ("user", content_blocks(content, &field(".content"))?),
            "assistant" => {
                let mut blocks = content_blocks(content, &field(".content"))?;
                for (j, call) in message
                    .get("tool_calls")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .enumerate()
                {
                    blocks.push(tool_use(call, &field(&format!(".tool_calls[{j}]")))?);
                }
                ("assistant", blocks)
            }
            "tool" => {
                let id = message
                    .get("tool_call_id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| field(".tool_call_id: required for a tool message"))?;
                let result = match content {
                    Value::String(s) => Value::String(s.clone()),
                    other => Value::Array(content_blocks(other, &field(".content"))?),
                };
                (
                    "user",
                    vec![json!({"type": "tool_result", "tool_use_id": id, "content": result})],
                )
            }
            other => {
                return Err(field(&format!(
                    ".role: {other:?} cannot be sent to Anthropic (use system, user, assistant or tool)"
                )));
            }
        };
        if blocks.is_empty() {
            continue;
        }
        // Anthropic wants user and assistant turns to alternate; consecutive messages of
        // one role (such as several tool results) become one turn.
        match turns.last_mut() {
            Some((last, existing)) if *last == role => existing.extend(blocks),
            _ => turns.push((role, blocks)),
        }
    }
    // A final assistant turn is a prefill that Anthropic continues; it refuses one that
    // ends in whitespace.
    if let Some(("assistant", blocks)) = turns.last_mut()
        && let Some(text) = blocks
            .last_mut()
            .and_then(|b| b.get_mut("text"))
            .filter(|t| t.is_string())
    {
        let trimmed = text.as_str().unwrap_or_default().trim_end().to_owned();
        *text = Value::String(trimmed);
    }
    let messages: Vec<Value> = turns
        .into_iter()
        .map(|(role, blocks)| {
            let content = match blocks.as_slice() {
                [only] if only.get("type").and_then(Value::as_str) == Some("text") => {
                    only.get("text").cloned().unwrap_or(Value::Null)
                }
                _ => Value::Array(blocks),
            };
            json!({"role": role, "content": content})
        })
        .collect();

    let mut out = Map::new();
    out.insert("model".into(), Value::String(model.to_owned()));
    if !system.is_empty() {
        out.insert("system".into(), Value::String(system.join("\n\n")));
    }
    out.insert("messages".into(), Value::Array(messages));
    let max_tokens = obj
        .get("max_completion_tokens")
        .or_else(|| obj.get("max_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or_else(|| u64::try_from(settings.default_max_tokens).unwrap_or(4096));
    out.insert("max_tokens".into(), Value::from(max_tokens));
    match obj.get("stop") {
        Some(Value::String(s)) => {
            out.insert("stop_sequences".into(), json!([s]));
        }
        Some(Value::Array(list)) if !list.is_empty() => {
            out.insert("stop_sequences".into(), Value::Array(list.clone()));
        }
        _ => {}
    }
    if let Some(t) = obj.get("temperature").and_then(Value::as_f64) {
        // OpenAI's scale runs to 2, Anthropic's to 1.
        out.insert("temperature".into(), Value::from(t.clamp(0.0, 1.0)));
    }
    if let Some(p) = obj.get("top_p").filter(|p| p.is_number()) {
        out.insert("top_p".into(), p.clone());
    }
    if obj.get("stream").and_then(Value::as_bool) == Some(true) {
        out.insert("stream".into(), Value::Bool(true));
    }
    if let Some(user) = obj.get("user").and_then(Value::as_str) {
        out.insert("metadata".into(), json!({"user_id": user}));
    }
    if let Some(tools) = obj.get("tools").and_then(Value::as_array)
        && !tools.is_empty()
    {
        let tools = tools
            .iter()
            .enumerate()
            .map(|(i, t)| tool(t, i))
            .collect::<Result<Vec<_>, _>>()?;
        out.insert("tools".into(), Value::Array(tools));
        let mut choice = match obj.get("tool_choice") {
            Some(Value::String(s)) if s == "required" => json!({"type": "any"}),
            Some(Value::String(s)) if s == "none" => json!({"type": "none"}),
            Some(Value::Object(c)) => {
                let name = c
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| "tool_choice.function.name: required".to_owned())?;
                json!({"type": "tool", "name": name})
            }
            _ => json!({"type": "auto"}),
        };
        if obj.get("parallel_tool_calls").and_then(Value::as_bool) == Some(false)
            && let Some(c) = choice.as_object_mut()
            && c.get("type").and_then(Value::as_str) != Some("none")
        {
            c.insert("disable_parallel_tool_use".into(), Value::Bool(true));
        }
        out.insert("tool_choice".into(), choice);
    }
    Ok(Value::Object(out))
}

/// OpenAI message content (a string or a list of parts) as Anthropic content blocks.
fn content_blocks(content: &Value, field: &str) -> Result<Vec<Value>, String> {
    match content {
        Value::Null => Ok(Vec::new()),
        Value::String(s) if s.is_empty() => Ok(Vec::new()),
        Value::String(s) => Ok(vec![json!({"type": "text", "text": s})]),
        Value::Array(parts) => {
            let mut blocks = Vec::with_capacity(parts.len());
            for (i, part) in parts.iter().enumerate() {
                match part.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        let text = part.get("text").and_then(Value::as_str).unwrap_or("");
                        // Anthropic refuses empty text blocks.
                        if !text.is_empty() {
                            blocks.push(json!({"type": "text", "text": text}));
                        }
                    }
                    Some("image_url") => {
                        let url = part
                            .pointer("/image_url/url")
                            .or_else(|| part.get("image_url"))
                            .and_then(Value::as_str)
                            .ok_or_else(|| format!("{field}[{i}].image_url.url: required"))?;
                        blocks.push(image(url, &format!("{field}[{i}].image_url.url"))?);
                    }
                    other => {
                        return Err(format!(
                            "{field}[{i}].type: {} content cannot be sent to Anthropic",
                            other.map_or_else(|| "untyped".to_owned(), |t| format!("{t:?}"))
                        ));
                    }
                }
            }
            Ok(blocks)
        }
        _ => Err(format!("{field}: expected a string or an array of parts")),
    }
}

fn image(url: &str, field: &str) -> Result<Value, String> {
    if let Some(rest) = url.strip_prefix("data:") {
        let (media_type, data) = rest
            .split_once(";base64,")
            .ok_or_else(|| format!("{field}: a data URL must be base64 encoded"))?;
        return Ok(
            json!({"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}),
        );
    }
    Ok(json!({"type": "image", "source": {"type": "url", "url": url}}))
}

fn tool_use(call: &Value, field: &str) -> Result<Value, String> {
    let id = call
        .get("id")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("{field}.id: required"))?;
    let name = call
        .pointer("/function/name")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("{field}.function.name: required"))?;
    let arguments = call
        .pointer("/function/arguments")
        .and_then(Value::as_str)
        .unwrap_or("{}");
    let input: Value = if arguments.trim().is_empty() {
        json!({})
    } else {
        serde_json::from_str(arguments)
            .map_err(|e| format!("{field}.function.arguments: not valid JSON ({e})"))?
    };
    Ok(json!({"type": "tool_use", "id": id, "name": name, "input": input}))
}

fn tool(t: &Value, i: usize) -> Result<Value, String> {
    if t.get("type").and_then(Value::as_str) != Some("function") {
        return Err(format!(
            "tools[{i}].type: only function tools can be sent to Anthropic"
        ));
    }
    let f = t
        .get("function")
        .ok_or_else(|| format!("tools[{i}].function: required"))?;
    let name = f
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("tools[{i}].function.name: required"))?;
    let mut out = json!({
        "name": name,
        "input_schema": f.get("parameters").cloned().unwrap_or_else(|| json!({"type": "object", "properties": {}})),
    });
    if let (Some(desc), Some(o)) = (f.get("description"), out.as_object_mut()) {
        o.insert("description".into(), desc.clone());
    }
    Ok(out)
}

/// OpenAI's finish reason for Anthropic's stop reason.
fn finish_reason(stop_reason: Option<&str>) -> &'static str {
    match stop_reason {
        Some("max_tokens" | "model_context_window_exceeded") => "length",
        Some("tool_use") => "tool_calls",
        Some("refusal") => "content_filter",
        _ => "stop",
    }
}

fn usage(u: &Value) -> Value {
    let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
    // Cached and cache-writing input tokens are input tokens the account is billed for.
    let prompt =
        n("input_tokens") + n("cache_creation_input_tokens") + n("cache_read_input_tokens");
    let completion = n("output_tokens");
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": n("cache_read_input_tokens")},
    })
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The chat completion for a Messages answer.
pub fn response(message: &Value) -> Result<Value, String> {
    if message.get("type").and_then(Value::as_str) != Some("message") {
        return Err("the answer is not an Anthropic message".to_owned());
    }
    let mut text = String::new();
    let mut calls = Vec::new();
    for block in message
        .get("content")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        match block.get("type").and_then(Value::as_str) {
            Some("text") => text.push_str(block.get("text").and_then(Value::as_str).unwrap_or("")),
            Some("tool_use") => calls.push(json!({
                "id": block.get("id"),
                "type": "function",
                "function": {
                    "name": block.get("name"),
                    "arguments": block.get("input").map_or_else(|| "{}".to_owned(), Value::to_string),
                },
            })),
            // Thinking blocks are the model's scratchpad, not its answer.
            _ => {}
        }
    }
    let mut msg = json!({"role": "assistant", "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { Value::String(text) }, "refusal": null});
    if !calls.is_empty()
        && let Some(m) = msg.as_object_mut()
    {
        m.insert("tool_calls".into(), Value::Array(calls));
    }
    Ok(json!({
        "id": message.get("id"),
        "object": "chat.completion",
        "created": now(),
        "model": message.get("model"),
        "choices": [{
            "index": 0,
            "message": msg,
            "finish_reason": finish_reason(message.get("stop_reason").and_then(Value::as_str)),
            "logprobs": null,
        }],
        "usage": usage(message.get("usage").unwrap_or(&Value::Null)),
    }))
}

/// Whether a Messages answer is a refusal, which the route's content-policy handling
/// treats like OpenAI's content-filter errors.
pub fn is_refusal(message: &Value) -> bool {
    message.get("stop_reason").and_then(Value::as_str) == Some("refusal")
}

/// An Anthropic error body as an OpenAI error body.
pub fn error(body: &Value) -> Value {
    let kind = body
        .pointer("/error/type")
        .and_then(Value::as_str)
        .unwrap_or("api_error");
    let message = body
        .pointer("/error/message")
        .and_then(Value::as_str)
        .unwrap_or("the provider returned an error without a message");
    let openai_type = match kind {
        "invalid_request_error" | "request_too_large" => "invalid_request_error",
        "authentication_error" => "authentication_error",
        "permission_error" => "permission_error",
        "not_found_error" => "not_found_error",
        "rate_limit_error" => "rate_limit_error",
        _ => "server_error",
    };
    let code = if message.to_ascii_lowercase().contains("prompt is too long") {
        "context_length_exceeded"
    } else {
        kind
    };
    json!({"error": {"message": message, "type": openai_type, "code": code, "param": null}})
}

/// Turns Anthropic's event stream into chat-completion chunks.
#[derive(Debug)]
pub struct StreamTranslator {
    include_usage: bool,
    id: Value,
    model: Value,
    created: u64,
    usage: Map<String, Value>,
    /// Content block indices of the tool calls, in order: a block's position here is its
    /// OpenAI tool call index.
    tools: Vec<u64>,
}

impl StreamTranslator {
    /// A translator; `include_usage` mirrors the client's `stream_options.include_usage`.
    pub fn new(include_usage: bool) -> Self {
        Self {
            include_usage,
            id: Value::Null,
            model: Value::Null,
            created: now(),
            usage: Map::new(),
            tools: Vec::new(),
        }
    }

    fn chunk(&self, delta: Value, finish: Option<&str>) -> Chunk {
        Chunk::built(
            &json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}]}),
        )
    }

    /// The usage chunk, from what the stream reported so far.
    pub fn usage_chunk(&self) -> Value {
        json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
               "choices": [], "usage": usage(&Value::Object(self.usage.clone()))})
    }

    fn merge_usage(&mut self, u: Option<&Value>) {
        if let Some(u) = u.and_then(Value::as_object) {
            for (k, v) in u {
                if v.is_u64() {
                    self.usage.insert(k.clone(), v.clone());
                }
            }
        }
    }

    /// Translates one event's `data`.
    pub fn event(&mut self, data: &str) -> Step {
        let Ok(event) = serde_json::from_str::<Value>(data) else {
            return Step::Malformed;
        };
        let Some(kind) = event.get("type").and_then(Value::as_str) else {
            return Step::Malformed;
        };
        match kind {
            "message_start" => {
                let Some(message) = event.get("message") else {
                    return Step::Malformed;
                };
                self.id = message.get("id").cloned().unwrap_or(Value::Null);
                self.model = message.get("model").cloned().unwrap_or(Value::Null);
                self.merge_usage(message.get("usage"));
                Step::Chunks(vec![
                    self.chunk(json!({"role": "assistant", "content": ""}), None),
                ])
            }
            "content_block_start" => {
                let block = event.get("content_block").unwrap_or(&Value::Null);
                let index = event.get("index").and_then(Value::as_u64).unwrap_or(0);
                match block.get("type").and_then(Value::as_str) {
                    Some("tool_use") => {
                        let call = self.tools.len();
                        self.tools.push(index);
                        Step::Chunks(vec![self.chunk(
                            json!({"tool_calls": [{"index": call, "id": block.get("id"), "type": "function",
                                                   "function": {"name": block.get("name"), "arguments": ""}}]}),
                            None,
                        )])
                    }
                    Some("text") => match block.get("text").and_then(Value::as_str) {
                        Some(t) if !t.is_empty() => {
                            Step::Chunks(vec![self.chunk(json!({"content": t}), None)])
                        }
                        _ => Step::Chunks(Vec::new()),
                    },
                    _ => Step::Chunks(Vec::new()),
                }
            }
            "content_block_delta" => {
                let delta = event.get("delta").unwrap_or(&Value::Null);
                let index = event.get("index").and_then(Value::as_u64).unwrap_or(0);
                match delta.get("type").and_then(Value::as_str) {
                    Some("text_delta") => match delta.get("text").and_then(Value::as_str) {
                        Some(t) => Step::Chunks(vec![self.chunk(json!({"content": t}), None)]),
                        None => Step::Malformed,
                    },
                    Some("input_json_delta") => {
                        let Some(call) = self.tools.iter().position(|block| *block == index) else {
                            return Step::Malformed;
                        };
                        let part = delta
                            .get("partial_json")
                            .and_then(Value::as_str)
                            .unwrap_or("");
                        if part.is_empty() {
                            return Step::Chunks(Vec::new());
                        }
                        Step::Chunks(vec![self.chunk(
                            json!({"tool_calls": [{"index": call, "function": {"arguments": part}}]}),
                            None,
                        )])
                    }
                    _ => Step::Chunks(Vec::new()),
                }
            }
            "message_delta" => {
                self.merge_usage(event.get("usage"));
                let reason = event.pointer("/delta/stop_reason").and_then(Value::as_str);
                Step::Chunks(vec![self.chunk(json!({}), Some(finish_reason(reason)))])
            }
            "message_stop" => Step::Done(if self.include_usage {
                vec![Chunk::built(&self.usage_chunk())]
            } else {
                Vec::new()
            }),
            "error" => Step::Failed(
                event
                    .pointer("/error/message")
                    .and_then(Value::as_str)
                    .map_or_else(
                        || "the provider reported an error mid-stream".to_owned(),
                        |m| format!("the provider reported an error mid-stream: {m}"),
                    ),
            ),
            // ping, content_block_stop, and event types added after this was written.
            _ => Step::Chunks(Vec::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dialect::tests::headers;

    fn settings() -> AnthropicSettings {
        AnthropicSettings::default()
    }

    #[test]
    fn overload_is_a_503_with_an_openai_error_body_and_a_long_prompt_a_context_error() {
        let body =
            br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
        let e = Anthropic.error(529, body);
        assert_eq!(e.status, 503);
        assert_eq!(e.body["error"]["type"], "server_error");
        assert_eq!(e.class, super::super::ErrorClass::Server);
        assert_eq!(Anthropic.error(529, b"<html>").status, 503);
        let long = br#"{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long: 210000 tokens > 200000 maximum"}}"#;
        assert_eq!(
            Anthropic.error(400, long).class,
            super::super::ErrorClass::ContextLength
        );
    }

    #[test]
    fn quota_and_reset_headers_are_read() {
        let report = Anthropic.rate_limits(&headers(&[
            ("anthropic-ratelimit-tokens-remaining", "5"),
            ("anthropic-ratelimit-tokens-limit", "80000"),
        ]));
        assert_eq!(report.remaining_tokens, Some(5));
        assert_eq!(report.limit_tokens, Some(80000));
        let reset = (k8s_openapi::jiff::Timestamp::now()
            + k8s_openapi::jiff::SignedDuration::from_secs(20))
        .to_string();
        let d = Anthropic
            .retry_after(&headers(&[("anthropic-ratelimit-requests-reset", &reset)]))
            .expect("a reset time");
        assert!(
            d > Duration::from_secs(18) && d <= Duration::from_secs(20),
            "{d:?}"
        );
    }

    #[test]
    fn system_messages_are_lifted_and_turns_alternate() {
        let body = json!({
            "model": "gpt-4o",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "developer", "content": [{"type": "text", "text": "Answer in English."}]},
                {"role": "user", "content": "Weather in Paris and Rome?"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}},
                    {"id": "call_2", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Rome\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
                {"role": "tool", "tool_call_id": "call_2", "content": "24C"},
            ],
            "max_tokens": 100, "temperature": 1.5, "stop": "END", "user": "u-1",
            "seed": 7, "logprobs": true, "stream_options": {"include_usage": true},
        });
        let out = request(&body, "claude-sonnet", &settings()).expect("translates");
        assert_eq!(out["system"], "Be brief.\n\nAnswer in English.");
        assert_eq!(out["max_tokens"], 100);
        assert_eq!(out["temperature"], 1.0);
        assert_eq!(out["stop_sequences"], json!(["END"]));
        assert_eq!(out["metadata"], json!({"user_id": "u-1"}));
        let messages = out["messages"].as_array().expect("messages");
        assert_eq!(messages.len(), 3, "{messages:?}");
        assert_eq!(messages[1]["content"][1]["input"], json!({"city": "Rome"}));
        assert_eq!(messages[2]["role"], "user");
        assert_eq!(messages[2]["content"][1]["tool_use_id"], "call_2");
        for dropped in ["seed", "logprobs", "stream_options", "n"] {
            assert!(out.get(dropped).is_none(), "{dropped} must be dropped");
        }
    }

    #[test]
    fn max_tokens_defaults_and_prefills_lose_trailing_whitespace() {
        let body = json!({"messages": [
            {"role": "user", "content": "Say hello"},
            {"role": "assistant", "content": "Hello from "},
        ]});
        let out = request(&body, "m", &settings()).expect("translates");
        assert_eq!(out["max_tokens"], 4096);
        assert_eq!(out["messages"][1]["content"], "Hello from");
    }

    #[test]
    fn what_anthropic_cannot_express_names_the_field() {
        let n = request(&json!({"messages": [], "n": 2}), "m", &settings());
        assert!(n.expect_err("n=2").starts_with("n:"));
        let audio = json!({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]});
        let e = request(&audio, "m", &settings()).expect_err("audio");
        assert!(e.starts_with("messages[0].content[0].type"), "{e}");
        let args = json!({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{oops"}}]}]});
        let e = request(&args, "m", &settings()).expect_err("bad arguments");
        assert!(
            e.starts_with("messages[0].tool_calls[0].function.arguments"),
            "{e}"
        );
    }

    #[test]
    fn answers_map_back_with_usage_and_finish_reasons() {
        let message = json!({"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet",
            "content": [{"type": "text", "text": "Let me check."},
                        {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}}],
            "stop_reason": "tool_use", "usage": {"input_tokens": 10, "cache_read_input_tokens": 5, "output_tokens": 7}});
        let out = response(&message).expect("translates");
        assert_eq!(out["model"], "claude-sonnet");
        assert_eq!(out["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(
            out["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
            "{\"city\":\"Paris\"}"
        );
        assert_eq!(out["usage"]["prompt_tokens"], 15);
        assert_eq!(out["usage"]["total_tokens"], 22);
    }

    #[test]
    fn overload_is_a_server_error_and_long_prompts_are_context_length_errors() {
        let body = error(
            &json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
        );
        assert_eq!(body["error"]["type"], "server_error");
        assert_eq!(body["error"]["message"], "Overloaded");
        let body = error(
            &json!({"type": "error", "error": {"type": "invalid_request_error", "message": "prompt is too long: 9000 tokens > 8192 maximum"}}),
        );
        assert_eq!(body["error"]["code"], "context_length_exceeded");
    }

    #[test]
    fn a_stream_becomes_chunks_then_usage_then_done() {
        let mut t = StreamTranslator::new(true);
        let events = [
            r#"{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet","content":[],"usage":{"input_tokens":12,"output_tokens":1}}}"#,
            r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
            r#"{"type":"ping"}"#,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}"#,
            r#"{"type":"content_block_stop","index":0}"#,
            r#"{"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_1","name":"weather","input":{}}}"#,
            r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"city\":"}}"#,
            r#"{"type":"message_delta","delta":{"stop_reason":"tool_use"},"usage":{"output_tokens":9}}"#,
        ];
        let chunks: Vec<Value> = events
            .iter()
            .flat_map(|e| match t.event(e) {
                Step::Chunks(c) => c.iter().map(Chunk::to_value).collect::<Vec<_>>(),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(chunks.len(), 5);
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(chunks[1]["choices"][0]["delta"]["content"], "Hi");
        assert_eq!(
            chunks[2]["choices"][0]["delta"]["tool_calls"][0]["id"],
            "toolu_1"
        );
        assert_eq!(
            chunks[3]["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"],
            "{\"city\":"
        );
        assert_eq!(chunks[4]["choices"][0]["finish_reason"], "tool_calls");
        let Step::Done(last) = t.event(r#"{"type":"message_stop"}"#) else {
            panic!("message_stop ends the stream");
        };
        let last: Vec<Value> = last.iter().map(Chunk::to_value).collect();
        assert_eq!(last[0]["usage"]["prompt_tokens"], 12);
        assert_eq!(last[0]["usage"]["completion_tokens"], 9);
        assert_eq!(t.event("{not json"), Step::Malformed);
        assert!(matches!(
            t.event(r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#),
            Step::Failed(m) if m.contains("Overloaded")
        ));
    }

    /// Each case in `tests/golden/anthropic` against its `.expected.json`; `UPDATE_GOLDEN=1`
    /// rewrites the expectations instead.
    #[test]
    fn translations_match_the_golden_files() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/anthropic");
        let mut cases = 0;
        for entry in std::fs::read_dir(&dir).expect("golden dir") {
            let path = entry.expect("entry").path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("")
                .to_owned();
            if name.ends_with(".expected.json") {
                continue;
            }
            let input = std::fs::read_to_string(&path).expect("case");
            let mut actual = if name.ends_with(".request.json") {
                let body: Value = serde_json::from_str(&input).expect("case json");
                let model = body["model"].as_str().unwrap_or_default().to_owned();
                request(&body, &model, &settings()).expect("translates")
            } else if name.ends_with(".response.json") {
                response(&serde_json::from_str(&input).expect("case json")).expect("translates")
            } else if name.ends_with(".stream.sse") {
                let mut t = StreamTranslator::new(true);
                let mut out = Vec::new();
                for data in input.lines().filter_map(|l| l.strip_prefix("data: ")) {
                    match t.event(data) {
                        Step::Chunks(c) => out.extend(c.iter().map(Chunk::to_value)),
                        Step::Done(c) => {
                            out.extend(c.iter().map(Chunk::to_value));
                            out.push(json!("[DONE]"));
                        }
                        other => out.push(json!(format!("{other:?}"))),
                    }
                }
                Value::Array(out)
            } else {
                continue;
            };
            normalise_created(&mut actual);
            let text = serde_json::to_string_pretty(&actual).expect("json") + "\n";
            let stem = name.split('.').next().unwrap_or_default();
            let expected_path = dir.join(format!("{stem}.expected.json"));
            if std::env::var_os("UPDATE_GOLDEN").is_some() {
                std::fs::write(&expected_path, &text).expect("golden written");
            }
            let expected = std::fs::read_to_string(&expected_path).unwrap_or_default();
            assert!(
                expected == text,
                "{} differs; inspect and rerun with UPDATE_GOLDEN=1\n--- actual ---\n{text}",
                expected_path.display()
            );
            cases += 1;
        }
        assert!(cases >= 5, "only {cases} golden cases found");
    }

    fn normalise_created(v: &mut Value) {
        match v {
            Value::Object(o) => {
                if o.contains_key("created") {
                    o.insert("created".into(), json!(0));
                }
                o.values_mut().for_each(normalise_created);
            }
            Value::Array(a) => a.iter_mut().for_each(normalise_created),
            _ => {}
        }
    }
}
