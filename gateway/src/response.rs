//! The body every response has, and the JSON and event-stream responses built on it.

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::{Response, StatusCode};

/// A response body: whole, streamed, or held against the memory budget.
pub type Body = BoxBody<Bytes, std::io::Error>;

/// A JSON response.
pub fn json_response(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut resp = Response::new(Full::new(body).map_err(|never| match never {}).boxed());
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// Marks a response as a server-sent event stream.
pub fn event_stream(resp: &mut Response<Body>) {
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
}
