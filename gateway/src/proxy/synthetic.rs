//! Answers the gateway makes up: a route's content-policy text, or its degraded answer.

use bytes::Bytes;
use hyper::{Response, StatusCode};
use serde_json::json;

use super::ClientRequest;
use crate::response::{Body, event_stream, json_response};

/// A complete answer the gateway makes up (content-policy response, degraded mode).
pub(super) fn synthetic_answer(
    req: &ClientRequest,
    text: &str,
    status: StatusCode,
) -> Response<Body> {
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
        event_stream(&mut resp);
        return resp;
    }
    let body = json!({"id": "switchyard", "object": "chat.completion", "created": created, "model": req.model,
                      "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                      "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}});
    json_response(status, Bytes::from(body.to_string()))
}
