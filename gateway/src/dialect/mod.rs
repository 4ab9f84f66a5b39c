//! Provider dialects: everything that differs between the APIs providers speak lives in
//! one module per dialect behind [`Dialect`] — addressing and authentication, request and
//! answer translation, error classification, stream decoding, continuing a partial
//! answer, and the health probe. The rest of the gateway speaks OpenAI's API and asks
//! [`of`] for the dialect of a provider.
//!
//! Adding a dialect: a `ProviderType` variant in `crds`, a module here implementing
//! [`Dialect`], and its arm in [`of`], the one match over provider types.

use std::fmt::Debug;
use std::time::Duration;

use bytes::Bytes;
use crds::pool::ProviderType;
use crds::{ProviderConfig, TargetConfig};
use http_body_util::Full;
use hyper::header::{ACCEPT, CONTENT_TYPE, HOST, HeaderName, HeaderValue};
use hyper::{HeaderMap, Method, Request, Uri};
use serde_json::{Value, json};

use crate::body::RequestBody;
use crate::health::RateLimitReport;
use crate::response::names;
use crate::table::ApiKey;

pub mod anthropic;
pub mod azure;
mod chunk;
pub mod openai;

pub use chunk::{Chunk, Facts};

/// The dialect a provider speaks.
pub fn of(kind: ProviderType) -> &'static dyn Dialect {
    match kind {
        ProviderType::OpenAi => &openai::OPENAI,
        ProviderType::OpenAiCompatible => &openai::COMPATIBLE,
        ProviderType::AzureOpenAi => &azure::AzureOpenAi,
        ProviderType::Anthropic => &anthropic::Anthropic,
    }
}

/// The OpenAI operations the gateway serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// `/v1/chat/completions`
    ChatCompletions,
    /// `/v1/completions`
    Completions,
    /// `/v1/embeddings`
    Embeddings,
}

impl Operation {
    /// From the request path.
    pub fn from_path(path: &str) -> Option<Self> {
        match path {
            "/v1/chat/completions" => Some(Self::ChatCompletions),
            "/v1/completions" => Some(Self::Completions),
            "/v1/embeddings" => Some(Self::Embeddings),
            _ => None,
        }
    }

    /// The path below `/v1/` (OpenAI) or below a deployment (Azure).
    pub fn suffix(self) -> &'static str {
        match self {
            Self::ChatCompletions => "chat/completions",
            Self::Completions => "completions",
            Self::Embeddings => "embeddings",
        }
    }
}

/// Where a request goes and the headers that authenticate it.
#[derive(Debug)]
pub struct Address {
    /// The full URL.
    pub url: String,
    /// Authentication and version headers. Never logged: they hold the key.
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

/// What one provider serving one target needs to build a request.
#[derive(Debug, Clone, Copy)]
pub struct Upstream<'a> {
    /// The provider as configured.
    pub provider: &'a ProviderConfig,
    /// Its key, when it has one.
    pub key: Option<&'a ApiKey>,
    /// The `Host` header for its endpoint, when known in advance.
    pub host: Option<&'a HeaderValue>,
}

impl Upstream<'_> {
    /// The endpoint without a trailing slash.
    pub fn endpoint(&self) -> &str {
        self.provider.endpoint.trim_end_matches('/')
    }

    /// `name: value` for the key, when there is one and it is a valid header value.
    pub fn key_header(
        &self,
        name: &'static str,
        prefix: &str,
    ) -> Option<(HeaderName, HeaderValue)> {
        let key = self.key?;
        let mut value = HeaderValue::from_str(&format!("{prefix}{}", key.0)).ok()?;
        value.set_sensitive(true);
        Some((HeaderName::from_static(name), value))
    }
}

/// A successful non-streamed answer in OpenAI's shape.
#[derive(Debug)]
pub struct Answer {
    /// The chat completion (or completion, or embeddings) body.
    pub body: Bytes,
    /// Whether it is a content-policy refusal.
    pub refusal: bool,
    /// Its `usage`, zeros where the provider did not say.
    pub usage: Usage,
}

/// Tokens an answer used, as its `usage` (OpenAI's shape) says.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub struct Usage {
    /// Tokens of the prompt.
    #[serde(default, rename = "prompt_tokens")]
    pub input: u64,
    /// Tokens of the answer.
    #[serde(default, rename = "completion_tokens")]
    pub output: u64,
    /// Both.
    #[serde(default, rename = "total_tokens")]
    pub total: u64,
}

impl Usage {
    /// From a `usage` object; zeros for what is missing or not a whole number.
    pub fn of(usage: &Value) -> Self {
        let n = |k: &str| usage.get(k).and_then(Value::as_u64).unwrap_or(0);
        Self {
            input: n("prompt_tokens"),
            output: n("completion_tokens"),
            total: n("total_tokens"),
        }
    }
}

/// What kind of failure a provider's error answer reports, as far as routing cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// 429: the provider's quota; try elsewhere and stay away for its `Retry-After`.
    RateLimited,
    /// The prompt does not fit the model; a larger-context model may take it.
    ContextLength,
    /// Refused on content-policy grounds.
    ContentPolicy,
    /// The provider's own failure (5xx, overload).
    Server,
    /// The request's fault (other 4xx); not the provider's.
    Client,
}

/// A provider's error answer as an OpenAI client expects it.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamError {
    /// The status an OpenAI client expects.
    pub status: u16,
    /// An OpenAI error body.
    pub body: Value,
    /// For routing.
    pub class: ErrorClass,
}

impl UpstreamError {
    /// The error's message, for logs and the final error's list of tries (bounded).
    pub fn message(&self) -> Option<String> {
        self.body
            .pointer("/error/message")
            .and_then(Value::as_str)
            .map(|m| m.chars().take(200).collect())
    }
}

/// One step of a stream, translated to chat-completion chunks.
#[derive(Debug, PartialEq)]
pub enum Step {
    /// Chunks to forward (possibly none, for events with no OpenAI counterpart).
    Chunks(Vec<Chunk>),
    /// The answer is complete; forward these chunks, then `[DONE]`.
    Done(Vec<Chunk>),
    /// The provider reported an error mid-stream; the answer is incomplete.
    Failed(String),
    /// Not a well-formed event; skipped, never forwarded.
    Malformed,
}

/// Reads one provider's stream events as chat-completion chunks.
pub trait StreamDecoder: Send + Debug {
    /// Translates one event's data.
    fn event(&mut self, data: String) -> Step;

    /// The usage the provider itself reported, for finalising a stream that ended
    /// without its closing event; `None` when the dialect reports usage in a chunk.
    fn reported_usage(&self) -> Option<Chunk> {
        None
    }
}

/// Whether and how a dialect continues a partial answer given to it as a final assistant
/// message (a prefill), so a stream broken mid-answer can resume on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefill {
    /// It starts a new answer instead (OpenAI, Azure OpenAI): never used to resume.
    Unsupported,
    /// It continues the message.
    Continues {
        /// The prefill is sent without its trailing whitespace (the API refuses it), so
        /// the continuation may repeat that whitespace.
        trims_whitespace: bool,
        /// Body fields that ask for a continuation rather than a new turn.
        flags: &'static [(&'static str, bool)],
    },
}

/// One provider API, spoken on behalf of OpenAI clients.
pub trait Dialect: Sync + Debug {
    /// Where a request for `op` to `target` goes and how it authenticates; an error names
    /// why this provider cannot serve it (another target may).
    fn address(
        &self,
        up: Upstream<'_>,
        target: &TargetConfig,
        op: Operation,
    ) -> Result<Address, String>;

    /// The body to send: the client's JSON addressed to `model`, translated if needed.
    fn body(&self, up: Upstream<'_>, body: &RequestBody, model: &str) -> Result<Bytes, String> {
        let _ = up;
        // Always rewritten, never the client's bytes as they are: JSON with two `model`
        // keys would otherwise be routed (and allow-listed) by one and served by the other.
        Ok(Bytes::from(body.with_model(model)))
    }

    /// Reads a successful answer; an error means it is not a well-formed answer.
    fn answer(&self, body: Bytes) -> Result<Answer, String> {
        openai_answer(body)
    }

    /// A provider's error answer, translated and classified.
    fn error(&self, status: u16, body: &[u8]) -> UpstreamError {
        let parsed = serde_json::from_slice(body).unwrap_or_else(|_| wrap_non_json(status, body));
        let class = openai_class(status, &parsed);
        UpstreamError {
            status,
            body: parsed,
            class,
        }
    }

    /// A decoder for its stream events.
    fn stream_decoder(&self, include_usage: bool) -> Box<dyn StreamDecoder>;

    /// Whether it can continue a partial answer.
    fn prefill(&self) -> Prefill;

    /// The quota its response headers describe.
    fn rate_limits(&self, headers: &HeaderMap) -> RateLimitReport {
        let [
            remaining_requests,
            remaining_tokens,
            limit_requests,
            limit_tokens,
        ] = numbers(
            headers,
            [
                "x-ratelimit-remaining-requests",
                "x-ratelimit-remaining-tokens",
                "x-ratelimit-limit-requests",
                "x-ratelimit-limit-tokens",
            ],
        );
        RateLimitReport {
            remaining_requests,
            remaining_tokens,
            limit_requests,
            limit_tokens,
        }
    }

    /// How long a 429 asks the gateway to stay away; `None` when the headers do not say.
    fn retry_after(&self, headers: &HeaderMap) -> Option<Duration> {
        standard_retry_after(headers).or_else(|| {
            ["x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"]
                .iter()
                .filter_map(|name| text(headers, name).and_then(|v| crds::Duration::parse(v).ok()))
                .map(crds::Duration::get)
                .max()
        })
    }

    /// Where its cheap health probe goes (the model list) and how it authenticates.
    fn probe(&self, up: Upstream<'_>) -> Address;
}

/// The upstream request for one try: `body` is the client's JSON, addressed to the
/// target's upstream model (or the client's, for pattern routes that pass it on).
pub fn build_request(
    up: Upstream<'_>,
    target: &TargetConfig,
    op: Operation,
    body: &RequestBody,
    request_id: &str,
) -> Result<Request<Full<Bytes>>, String> {
    let dialect = of(up.provider.provider_type);
    let model = target
        .upstream_model
        .as_deref()
        .unwrap_or(body.model().unwrap_or_default());
    let address = dialect.address(up, target, op)?;
    let bytes = dialect.body(up, body, model)?;
    // Built in place rather than with `Request::builder`, whose per-header conversions
    // were a noticeable share of a request's cost.
    let mut req = Request::new(Full::new(bytes));
    *req.method_mut() = Method::POST;
    // The error names the URL, never the headers (which hold the key).
    *req.uri_mut() = Uri::try_from(address.url.as_str())
        .map_err(|e| format!("invalid upstream request to {}: {e}", address.url))?;
    let h = req.headers_mut();
    h.reserve(5 + address.headers.len());
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(
        ACCEPT,
        HeaderValue::from_static("application/json, text/event-stream"),
    );
    // The id was checked to be printable ASCII when it was taken or made.
    if let Ok(id) = HeaderValue::from_str(request_id) {
        h.insert(&names::X_REQUEST_ID, id);
    }
    if let Some(host) = up.host {
        h.insert(HOST, host.clone());
    }
    for (name, value) in address.headers {
        h.append(name, value);
    }
    Ok(req)
}

/// The probe request for a provider.
pub fn probe_request(up: Upstream<'_>) -> Option<Request<Full<Bytes>>> {
    let address = of(up.provider.provider_type).probe(up);
    let mut builder = Request::builder().method(Method::GET).uri(&address.url);
    for (name, value) in address.headers {
        builder = builder.header(name, value);
    }
    builder.body(Full::new(Bytes::new())).ok()
}

/// Reads an OpenAI-shaped answer: only `usage` is looked at, but every byte is checked to
/// be JSON.
fn openai_answer(body: Bytes) -> Result<Answer, String> {
    // Typed down to the usage numbers, so nothing else in the answer is built as a tree.
    #[derive(serde::Deserialize)]
    struct UsageOnly {
        usage: Option<Usage>,
    }
    let parsed: UsageOnly = serde_json::from_slice(&body)
        .map_err(|_| "the response body is not valid JSON".to_owned())?;
    Ok(Answer {
        usage: parsed.usage.unwrap_or_default(),
        body,
        refusal: false,
    })
}

/// A body that is not JSON reaches the client wrapped in an OpenAI error.
fn wrap_non_json(status: u16, body: &[u8]) -> Value {
    json!({"error": {"message": String::from_utf8_lossy(body), "type": "upstream_error", "code": status.to_string(), "param": null}})
}

/// How OpenAI and its compatible servers say what went wrong.
fn openai_class(status: u16, body: &Value) -> ErrorClass {
    let code = body
        .pointer("/error/code")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let message = body
        .pointer("/error/message")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_ascii_lowercase();
    match status {
        429 => ErrorClass::RateLimited,
        400 | 413
            if code == "context_length_exceeded"
                || message.contains("maximum context length")
                || message.contains("prompt is too long") =>
        {
            ErrorClass::ContextLength
        }
        // Azure's content filter too: compatible proxies in front of Azure pass it on.
        400 | 413
            if matches!(code, "content_policy_violation" | "content_filter")
                || body
                    .pointer("/error/innererror/code")
                    .and_then(Value::as_str)
                    == Some("ResponsibleAIPolicyViolation") =>
        {
            ErrorClass::ContentPolicy
        }
        500.. => ErrorClass::Server,
        _ => ErrorClass::Client,
    }
}

fn text<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

/// The headers called `names`, as numbers, read in one pass over the response's headers:
/// looking each up by a string name would parse and hash it, on every answer.
fn numbers<const N: usize>(headers: &HeaderMap, names: [&str; N]) -> [Option<u64>; N] {
    let mut found = [None; N];
    for (name, value) in headers {
        if let Some(i) = names.iter().position(|n| *n == name.as_str())
            && found[i].is_none()
        {
            found[i] = value.to_str().ok().and_then(|v| v.trim().parse().ok());
        }
    }
    found
}

/// `retry-after-ms` (Azure's `x-ms-retry-after-ms`), then `retry-after` (seconds or an
/// HTTP date), capped at an hour.
fn standard_retry_after(headers: &HeaderMap) -> Option<Duration> {
    for name in ["retry-after-ms", "x-ms-retry-after-ms"] {
        if let Some(ms) = text(headers, name).and_then(|v| v.parse::<f64>().ok()) {
            return Some(Duration::from_secs_f64((ms / 1000.0).clamp(0.0, 3600.0)));
        }
    }
    let v = text(headers, "retry-after")?;
    if let Ok(secs) = v.parse::<f64>() {
        return Some(Duration::from_secs_f64(secs.clamp(0.0, 3600.0)));
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or_default()
            .min(Duration::from_secs(3600)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().expect("valid header"));
        }
        h
    }

    #[test]
    fn retry_after_reads_the_headers_openai_and_compatible_servers_use() {
        let d = of(ProviderType::OpenAiCompatible);
        let after = |pairs: &[(&'static str, &str)]| d.retry_after(&headers(pairs));
        assert_eq!(after(&[("retry-after", "2")]), Some(Duration::from_secs(2)));
        assert_eq!(
            after(&[("retry-after-ms", "250")]),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            after(&[("x-ms-retry-after-ms", "1500")]),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            after(&[
                ("x-ratelimit-reset-requests", "1s"),
                ("x-ratelimit-reset-tokens", "6m0s")
            ]),
            Some(Duration::from_secs(360))
        );
        assert_eq!(
            after(&[("retry-after-ms", "100"), ("retry-after", "9")]),
            Some(Duration::from_millis(100))
        );
        assert_eq!(after(&[]), None);
        let future =
            httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(30));
        let d = after(&[("retry-after", &future)]).expect("a date");
        assert!(
            d > Duration::from_secs(28) && d <= Duration::from_secs(30),
            "{d:?}"
        );
    }

    #[test]
    fn quota_headers_are_read() {
        let openai = of(ProviderType::OpenAi).rate_limits(&headers(&[
            ("x-ratelimit-remaining-requests", "9"),
            ("x-ratelimit-limit-requests", "10"),
            ("x-ratelimit-remaining-tokens", "1200"),
        ]));
        assert_eq!(
            openai,
            RateLimitReport {
                remaining_requests: Some(9),
                limit_requests: Some(10),
                remaining_tokens: Some(1200),
                limit_tokens: None,
            }
        );
    }

    #[test]
    fn openai_errors_are_classified_by_status_code_and_message() {
        let d = of(ProviderType::OpenAi);
        let class = |status, body: &str| d.error(status, body.as_bytes()).class;
        assert_eq!(class(429, "{}"), ErrorClass::RateLimited);
        assert_eq!(
            class(
                400,
                r#"{"error":{"code":"context_length_exceeded","message":"x"}}"#
            ),
            ErrorClass::ContextLength
        );
        assert_eq!(
            class(
                400,
                r#"{"error":{"message":"This model's maximum context length is 8192 tokens"}}"#
            ),
            ErrorClass::ContextLength
        );
        assert_eq!(
            class(400, r#"{"error":{"code":"content_policy_violation"}}"#),
            ErrorClass::ContentPolicy
        );
        assert_eq!(
            class(400, r#"{"error":{"code":"content_filter"}}"#),
            ErrorClass::ContentPolicy
        );
        assert_eq!(
            class(
                400,
                r#"{"error":{"code":"x","innererror":{"code":"ResponsibleAIPolicyViolation"}}}"#
            ),
            ErrorClass::ContentPolicy
        );
        assert_eq!(
            class(400, r#"{"error":{"code":"invalid"}}"#),
            ErrorClass::Client
        );
        assert_eq!(class(503, "<html>"), ErrorClass::Server);
        let wrapped = d.error(502, b"<html>bad gateway</html>");
        assert_eq!(wrapped.body["error"]["type"], "upstream_error");
        assert_eq!(
            wrapped.message().as_deref(),
            Some("<html>bad gateway</html>")
        );
    }

    #[test]
    fn every_dialect_addresses_its_probe_and_says_whether_it_continues_answers() {
        for kind in [
            ProviderType::OpenAi,
            ProviderType::OpenAiCompatible,
            ProviderType::AzureOpenAi,
            ProviderType::Anthropic,
        ] {
            let d = of(kind);
            let provider: ProviderConfig = serde_json::from_value(json!({
                "name": "p", "type": kind, "endpoint": "https://h.example/", "region": "r",
                "local": true, "enabled": true, "limits": {}, "health": {},
                "azureApiVersion": "2024-10-21"
            }))
            .expect("provider");
            let key = ApiKey("sk-1".into());
            let probe = d.probe(Upstream {
                provider: &provider,
                key: Some(&key),
                host: None,
            });
            assert!(
                probe.url.starts_with("https://h.example/"),
                "{kind:?}: {}",
                probe.url
            );
            assert!(!probe.url.contains("//v1"), "{kind:?}: {}", probe.url);
            assert!(
                probe
                    .headers
                    .iter()
                    .any(|(_, v)| v.to_str().is_ok_and(|v| v.contains("sk-1"))),
                "{kind:?} authenticates its probe"
            );
            let continues = !matches!(d.prefill(), Prefill::Unsupported);
            assert_eq!(
                continues,
                matches!(
                    kind,
                    ProviderType::OpenAiCompatible | ProviderType::Anthropic
                ),
                "{kind:?}"
            );
        }
    }
}
