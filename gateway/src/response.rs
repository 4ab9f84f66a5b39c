//! The body every response has, and the JSON and event-stream responses built on it.

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderName, HeaderValue};
use hyper::{Response, StatusCode};

/// Header names the gateway sets on every request or answer, parsed once.
pub mod names {
    use super::HeaderName;

    /// The request's id, sent upstream and returned.
    pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
    /// How many tries the answer took.
    pub static X_ATTEMPTS: HeaderName = HeaderName::from_static("x-switchyard-attempts");
    /// The provider that served.
    pub static X_PROVIDER: HeaderName = HeaderName::from_static("x-switchyard-provider");
    /// That provider's region.
    pub static X_PROVIDER_REGION: HeaderName =
        HeaderName::from_static("x-switchyard-provider-region");
    /// The gateway's region.
    pub static X_REGION: HeaderName = HeaderName::from_static("x-switchyard-region");
    /// On a request no provider could serve: each failed try, `provider:class`.
    pub static X_FAILURES: HeaderName = HeaderName::from_static("x-switchyard-failures");
}

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
