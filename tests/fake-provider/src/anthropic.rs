//! Anthropic's Messages API (`POST /v1/messages`), strict about what it accepts the way
//! the real API is, so a translator that sends a field Anthropic does not know, a
//! `system` role inside `messages`, or no `max_tokens` is caught here.

use std::time::Duration;

use bytes::Bytes;
use hyper::body::Frame;
use hyper::{HeaderMap, Response, StatusCode};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::{Body, full, stream_fault};

const TOP_LEVEL: &[&str] = &[
    "model",
    "messages",
    "max_tokens",
    "system",
    "stop_sequences",
    "stream",
    "temperature",
    "top_p",
    "top_k",
    "tools",
    "tool_choice",
    "metadata",
    "thinking",
    "service_tier",
];

/// An error in Anthropic's shape.
pub fn error(status: StatusCode, kind: &str, message: &str) -> Response<Body> {
    full(
        status,
        json!({"type": "error", "error": {"type": kind, "message": message}}),
    )
}

/// Why the real API would refuse this request, if it would.
pub fn invalid(headers: &HeaderMap, request: &Value) -> Option<Response<Body>> {
    if headers.get("x-api-key").is_none() {
        return Some(error(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "x-api-key header is required",
        ));
    }
    if headers.get("anthropic-version").is_none() {
        return Some(error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "anthropic-version: header is required",
        ));
    }
    let bad = |m: String| Some(error(StatusCode::BAD_REQUEST, "invalid_request_error", &m));
    let Some(obj) = request.as_object() else {
        return bad("body: expected a JSON object".into());
    };
    if let Some(extra) = obj.keys().find(|k| !TOP_LEVEL.contains(&k.as_str())) {
        return bad(format!("{extra}: Extra inputs are not permitted"));
    }
    if !obj.get("max_tokens").is_some_and(Value::is_u64) {
        return bad("max_tokens: Field required".into());
    }
    if let Some(t) = obj.get("temperature").and_then(Value::as_f64)
        && !(0.0..=1.0).contains(&t)
    {
        return bad("temperature: Input should be less than or equal to 1".into());
    }
    let Some(messages) = obj.get("messages").and_then(Value::as_array) else {
        return bad("messages: Field required".into());
    };
    let mut previous = "";
    for (i, m) in messages.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        if role != "user" && role != "assistant" {
            return bad(format!(
                "messages.{i}.role: Input should be 'user' or 'assistant'"
            ));
        }
        if role == previous {
            return bad(format!(
                "messages.{i}: roles must alternate between \"user\" and \"assistant\""
            ));
        }
        previous = role;
        match m.get("content") {
            Some(Value::String(s)) if !s.is_empty() => {}
            Some(Value::Array(blocks)) if !blocks.is_empty() => {
                for (j, b) in blocks.iter().enumerate() {
                    let kind = b.get("type").and_then(Value::as_str).unwrap_or("");
                    let ok = match kind {
                        "text" => b
                            .get("text")
                            .and_then(Value::as_str)
                            .is_some_and(|t| !t.is_empty()),
                        "image" => b.pointer("/source/type").is_some(),
                        "tool_use" => {
                            role == "assistant"
                                && b.get("id").is_some()
                                && b.get("input").is_some_and(Value::is_object)
                        }
                        "tool_result" => role == "user" && b.get("tool_use_id").is_some(),
                        _ => false,
                    };
                    if !ok {
                        return bad(format!("messages.{i}.content.{j}: invalid {kind:?} block"));
                    }
                }
            }
            _ => return bad(format!("messages.{i}.content: must be non-empty")),
        }
        if i + 1 == messages.len()
            && role == "assistant"
            && m.get("content")
                .and_then(Value::as_str)
                .is_some_and(|s| s.ends_with(char::is_whitespace))
        {
            return bad("final assistant content cannot end with trailing whitespace".into());
        }
    }
    None
}

/// The last message's text, which [`crate::answer`] reads for prefills.
pub fn as_openai_messages(request: &Value) -> Value {
    let last = request
        .get("messages")
        .and_then(Value::as_array)
        .and_then(|m| m.last());
    let role = last.and_then(|m| m.get("role")).cloned();
    let content = match last.and_then(|m| m.get("content")) {
        Some(Value::Array(blocks)) => Value::String(
            blocks
                .iter()
                .filter_map(|b| b.get("text").and_then(Value::as_str))
                .collect(),
        ),
        other => other.cloned().unwrap_or(Value::Null),
    };
    json!({"messages": [{"role": role, "content": content}]})
}

/// A tool call for the first tool, unless the conversation already carries its result.
fn tool_call(request: &Value) -> Option<(String, Value)> {
    let tool = request.get("tools")?.as_array()?.first()?;
    let last_has_result = request
        .get("messages")
        .and_then(Value::as_array)
        .and_then(|m| m.last())
        .and_then(|m| m.get("content"))
        .and_then(Value::as_array)
        .is_some_and(|b| {
            b.iter()
                .any(|b| b.get("type").and_then(Value::as_str) == Some("tool_result"))
        });
    if last_has_result {
        return None;
    }
    Some((
        tool.get("name")?.as_str()?.to_owned(),
        json!({"city": "Paris"}),
    ))
}

/// Input tokens are the words of the prompt's text, so two requests that say the same
/// thing in different block layouts cost the same.
fn usage(request: &Value, text: &str) -> (u64, u64) {
    fn words(v: &Value) -> usize {
        match v {
            Value::String(s) => s.split_whitespace().count(),
            Value::Array(a) => a.iter().map(words).sum(),
            Value::Object(o) => ["text", "content"]
                .iter()
                .filter_map(|k| o.get(*k))
                .map(words)
                .sum(),
            _ => 0,
        }
    }
    let input = words(request.get("system").unwrap_or(&Value::Null))
        + words(request.get("messages").unwrap_or(&Value::Null));
    let output = text.split_whitespace().count().max(1);
    (
        u64::try_from(input).unwrap_or(0),
        u64::try_from(output).unwrap_or(0),
    )
}

/// A whole answer.
pub fn message(name: &str, model: &str, request: &Value, text: &str, refusal: bool) -> Value {
    let (input, output) = usage(request, text);
    let (content, stop) = match tool_call(request) {
        Some((tool, input)) if !refusal => (
            json!([{"type": "tool_use", "id": format!("toolu_{name}"), "name": tool, "input": input}]),
            "tool_use",
        ),
        _ => (
            json!([{"type": "text", "text": text}]),
            if refusal { "refusal" } else { "end_turn" },
        ),
    };
    json!({"id": format!("msg_{name}"), "type": "message", "role": "assistant", "model": model,
           "content": content, "stop_reason": stop, "stop_sequence": null,
           "usage": {"input_tokens": input, "output_tokens": output}})
}

/// The answer as Anthropic's event stream, with stream faults applied.
pub fn stream(
    name: &str,
    model: &str,
    request: &Value,
    text: &str,
    fault: &str,
    arg: &str,
) -> Response<Body> {
    let (input, output) = usage(request, text);
    let words: Vec<String> = text.split_inclusive(' ').map(str::to_owned).collect();
    let tool = tool_call(request);
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(16);
    let at: usize = arg.parse().unwrap_or(2);
    let fault = fault.to_owned();
    let id = format!("msg_{name}");
    let model = model.to_owned();
    let name = name.to_owned();
    tokio::spawn(async move {
        let send = |kind: &'static str, data: Value| {
            let tx = tx.clone();
            async move {
                tx.send(Ok(Frame::data(Bytes::from(format!(
                    "event: {kind}\ndata: {data}\n\n"
                )))))
                .await
                .is_ok()
            }
        };
        let start = json!({"type": "message_start", "message": {"id": id, "type": "message", "role": "assistant",
            "model": model, "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": input, "output_tokens": 1}}});
        if !send("message_start", start).await || !send("ping", json!({"type": "ping"})).await {
            return;
        }
        let stop = if let Some((tool, args)) = tool {
            let block = json!({"type": "content_block_start", "index": 0,
                "content_block": {"type": "tool_use", "id": format!("toolu_{name}"), "name": tool, "input": {}}});
            let args = args.to_string();
            let (a, b) = args.split_at(args.len() / 2);
            let _ = send("content_block_start", block).await;
            for part in [a, b] {
                let _ = send(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": 0,
                    "delta": {"type": "input_json_delta", "partial_json": part}}),
                )
                .await;
            }
            "tool_use"
        } else {
            let _ = send(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            )
            .await;
            for (i, word) in words.iter().enumerate() {
                if i == at {
                    if fault == "error-after" {
                        let _ = send("error", json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})).await;
                        return;
                    }
                    let garbage = b"event: content_block_delta\ndata: {\"type\": \"content_block_delta\", \"delta\": \n\n";
                    if stream_fault(&tx, &fault, garbage).await {
                        return;
                    }
                }
                let delta = json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": word}});
                if !send("content_block_delta", delta).await {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            if fault == "content-policy" {
                "refusal"
            } else {
                "end_turn"
            }
        };
        let _ = send(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        )
        .await;
        let _ = send(
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null},
                                              "usage": {"output_tokens": output}}),
        )
        .await;
        if fault != "no-done" {
            let _ = send("message_stop", json!({"type": "message_stop"})).await;
        }
    });
    crate::streamed(rx, "text/event-stream")
}
