//! Errors the gateway itself generates, shaped like OpenAI's so SDKs surface them well.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Response, StatusCode};
use serde_json::json;

use crate::server::Body;

/// An OpenAI-style error: `{"error": {"message", "type", "code", "param"}}` with a stable
/// `type` and `code`.
pub fn error_response(status: StatusCode, kind: &str, code: &str, message: &str) -> Response<Body> {
    let body = json!({"error": {"message": message, "type": kind, "code": code, "param": null}});
    json_response(status, body.to_string().into())
}

/// A JSON response.
pub fn json_response(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut resp = Response::new(Full::new(body).map_err(|never| match never {}).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}
