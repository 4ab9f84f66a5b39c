//! Talking to providers: the pooled HTTP client and each dialect's request shape.

use std::time::Duration;

use bytes::Bytes;
use crds::TargetConfig;
use crds::pool::ProviderType;
use http_body_util::Full;
use hyper::{Method, Request};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde_json::Value;

use crate::body::RequestBody;
use crate::health::RateLimitReport;
use crate::table::ProviderEntry;

pub mod anthropic;

/// The upstream client: pooled keep-alive connections, TLS by rustls, HTTP/2 where the
/// provider offers it through ALPN.
pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// TLS settings for providers: the web PKI roots, plus the certificates in `extra_ca`
/// (PEM) for providers behind a private CA, such as a self-hosted vLLM.
pub fn tls_config(extra_ca: Option<&std::path::Path>) -> anyhow::Result<rustls::ClientConfig> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = extra_ca {
        let mut added = 0;
        for cert in CertificateDer::pem_file_iter(path)
            .map_err(|e| anyhow::anyhow!("--ca-file {}: {e}", path.display()))?
        {
            let cert = cert.map_err(|e| anyhow::anyhow!("--ca-file {}: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| anyhow::anyhow!("--ca-file {}: {e}", path.display()))?;
            added += 1;
        }
        anyhow::ensure!(
            added > 0,
            "--ca-file {}: no PEM certificate in it",
            path.display()
        );
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// A client whose TCP connect gives up after `connect`.
pub fn new_client(connect: Duration, idle: Duration, tls: rustls::ClientConfig) -> HttpClient {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(connect));
    http.set_nodelay(true);
    http.enforce_http(false);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    // Without a timer the pool never closes idle connections.
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(idle)
        .pool_max_idle_per_host(256)
        .build(https)
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

    fn suffix(self) -> &'static str {
        match self {
            Self::ChatCompletions => "chat/completions",
            Self::Completions => "completions",
            Self::Embeddings => "embeddings",
        }
    }
}

/// Builds the upstream request for one try. `body` is the client's JSON; its `model` is
/// replaced by the target's upstream model (or kept, for pattern routes that pass it on),
/// and it is translated for providers that do not speak the OpenAI API.
pub fn build_request(
    provider: &ProviderEntry,
    target: &TargetConfig,
    op: Operation,
    body: &RequestBody,
    request_id: &str,
) -> Result<Request<Full<Bytes>>, String> {
    let model = target
        .upstream_model
        .as_deref()
        .unwrap_or(body.model().unwrap_or_default());
    let mut translated = None;
    let endpoint = provider.config.endpoint.trim_end_matches('/');
    let key = provider.api_key.as_ref().map(|k| k.0.as_str());
    let mut headers: Vec<(&'static str, String)> = Vec::with_capacity(2);
    let url = match provider.config.provider_type {
        ProviderType::AzureOpenAi => {
            let deployment = target
                .deployment
                .as_deref()
                .ok_or_else(|| format!("target {} has no Azure deployment", target.provider))?;
            let version = provider
                .config
                .azure_api_version
                .as_deref()
                .unwrap_or("2024-10-21");
            headers.extend(key.map(|k| ("api-key", k.to_owned())));
            format!(
                "{endpoint}/openai/deployments/{deployment}/{}?api-version={version}",
                op.suffix()
            )
        }
        ProviderType::OpenAi | ProviderType::OpenAiCompatible => {
            headers.extend(key.map(|k| ("authorization", format!("Bearer {k}"))));
            format!("{endpoint}/v1/{}", op.suffix())
        }
        ProviderType::Anthropic => {
            if op != Operation::ChatCompletions {
                return Err(format!(
                    "Anthropic serves chat completions only, not /v1/{}",
                    op.suffix()
                ));
            }
            let settings = provider.config.anthropic.clone().unwrap_or_default();
            translated = Some(anthropic::request(&body.to_value()?, model, &settings)?);
            headers.extend(key.map(|k| ("x-api-key", k.to_owned())));
            headers.push(("anthropic-version", settings.version));
            format!("{endpoint}/v1/messages")
        }
    };
    let bytes = match &translated {
        Some(t) => serde_json::to_vec(t).map_err(|e| e.to_string())?,
        // Always rewritten, never the client's bytes as they are: JSON with two `model`
        // keys would otherwise be routed (and allow-listed) by one and served by the other.
        None => body.with_model(model),
    };
    let mut builder = Request::builder()
        .method(Method::POST)
        .uri(&url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("x-request-id", request_id);
    for (name, value) in headers {
        builder = builder.header(name, value);
    }
    // The error names the URL, never the headers (which hold the key).
    builder
        .body(Full::new(Bytes::from(bytes)))
        .map_err(|e| format!("invalid upstream request to {url}: {e}"))
}

/// A successful non-streamed answer in OpenAI's shape.
#[derive(Debug)]
pub struct Answer {
    /// The chat completion (or completion, or embeddings) body.
    pub body: Bytes,
    /// Whether it is a content-policy refusal.
    pub refusal: bool,
    /// `usage.total_tokens`, zero when the provider did not say.
    pub tokens: u64,
}

/// Reads a successful answer; an error means it is not a well-formed answer.
pub fn answer(kind: ProviderType, body: Bytes) -> Result<Answer, String> {
    /// Only `usage` is looked at, but every byte is checked to be JSON.
    #[derive(serde::Deserialize)]
    struct UsageOnly {
        #[serde(default)]
        usage: Option<Value>,
    }
    let total = |usage: Option<&Value>| {
        usage
            .and_then(|u| u.get("total_tokens"))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    match kind {
        ProviderType::Anthropic => {
            let message: Value = serde_json::from_slice(&body)
                .map_err(|_| "the response body is not valid JSON".to_owned())?;
            let refusal = anthropic::is_refusal(&message);
            let out = anthropic::response(&message)?;
            Ok(Answer {
                tokens: total(out.get("usage")),
                body: Bytes::from(out.to_string()),
                refusal,
            })
        }
        _ => {
            let parsed: UsageOnly = serde_json::from_slice(&body)
                .map_err(|_| "the response body is not valid JSON".to_owned())?;
            Ok(Answer {
                tokens: total(parsed.usage.as_ref()),
                body,
                refusal: false,
            })
        }
    }
}

/// A provider's error answer as an OpenAI error: the status an OpenAI client expects and
/// the body (`None` for a body that is not JSON).
pub fn error(kind: ProviderType, status: u16, body: &[u8]) -> (u16, Option<Value>) {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    if kind != ProviderType::Anthropic {
        return (status, parsed);
    }
    // Anthropic's 529 "overloaded" is what OpenAI clients and the retry policy know as 503.
    let status = if status == 529 { 503 } else { status };
    match parsed {
        Some(v) if v.get("type").and_then(Value::as_str) == Some("error") => {
            (status, Some(anthropic::error(&v)))
        }
        other => (status, other),
    }
}

/// One step of a stream, translated to chat-completion chunks.
#[derive(Debug, PartialEq)]
pub enum Step {
    /// Chunks to forward (possibly none, for events with no OpenAI counterpart).
    Chunks(Vec<Value>),
    /// The answer is complete; forward these chunks, then `[DONE]`.
    Done(Vec<Value>),
    /// The provider reported an error mid-stream; the answer is incomplete.
    Failed(String),
    /// Not a well-formed event; skipped, never forwarded.
    Malformed,
}

/// Reads one provider's stream events as chat-completion chunks.
#[derive(Debug)]
pub enum StreamDecoder {
    /// OpenAI, Azure OpenAI and compatible servers: chunks pass through.
    OpenAi,
    /// Anthropic's event stream, translated.
    Anthropic(anthropic::StreamTranslator),
}

impl StreamDecoder {
    /// The decoder for a provider's wire format.
    pub fn new(kind: ProviderType, include_usage: bool) -> Self {
        match kind {
            ProviderType::Anthropic => {
                Self::Anthropic(anthropic::StreamTranslator::new(include_usage))
            }
            _ => Self::OpenAi,
        }
    }

    /// Translates one event's data.
    pub fn event(&mut self, data: &str) -> Step {
        match self {
            Self::OpenAi if data == "[DONE]" => Step::Done(Vec::new()),
            Self::OpenAi => match serde_json::from_str::<Value>(data) {
                Ok(chunk) if chunk.is_object() => Step::Chunks(vec![chunk]),
                _ => Step::Malformed,
            },
            Self::Anthropic(t) => t.event(data),
        }
    }

    /// The usage the provider itself reported, for finalising a stream that ended
    /// without its closing event.
    pub fn reported_usage(&self) -> Option<Value> {
        match self {
            Self::OpenAi => None,
            Self::Anthropic(t) => Some(t.usage_chunk()),
        }
    }
}

/// The quota a response's rate-limit headers describe (OpenAI's and Azure's
/// `x-ratelimit-*`, Anthropic's `anthropic-ratelimit-*`).
pub fn rate_limits(headers: &hyper::HeaderMap) -> RateLimitReport {
    let number = |names: &[&str]| {
        names.iter().find_map(|n| {
            headers
                .get(*n)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
    };
    RateLimitReport {
        remaining_requests: number(&[
            "x-ratelimit-remaining-requests",
            "anthropic-ratelimit-requests-remaining",
        ]),
        remaining_tokens: number(&[
            "x-ratelimit-remaining-tokens",
            "anthropic-ratelimit-tokens-remaining",
        ]),
        limit_requests: number(&[
            "x-ratelimit-limit-requests",
            "anthropic-ratelimit-requests-limit",
        ]),
        limit_tokens: number(&[
            "x-ratelimit-limit-tokens",
            "anthropic-ratelimit-tokens-limit",
        ]),
    }
}

/// How long a 429 asks the gateway to stay away: `retry-after-ms`, `x-ms-retry-after-ms`,
/// `retry-after` (seconds or an HTTP date), the longer of `x-ratelimit-reset-requests` and
/// `-tokens`, or the latest of Anthropic's `anthropic-ratelimit-*-reset` timestamps. One
/// second when the provider says nothing.
pub fn retry_after(headers: &hyper::HeaderMap) -> Duration {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    for name in ["retry-after-ms", "x-ms-retry-after-ms"] {
        if let Some(ms) = text(name).and_then(|v| v.parse::<f64>().ok()) {
            return Duration::from_secs_f64((ms / 1000.0).clamp(0.0, 3600.0));
        }
    }
    if let Some(v) = text("retry-after") {
        if let Ok(secs) = v.parse::<f64>() {
            return Duration::from_secs_f64(secs.clamp(0.0, 3600.0));
        }
        if let Ok(when) = httpdate::parse_http_date(v) {
            return when
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default();
        }
    }
    let resets = ["x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"]
        .iter()
        .filter_map(|name| text(name).and_then(|v| crds::Duration::parse(v).ok()))
        .map(crds::Duration::get)
        .max();
    if let Some(d) = resets {
        return d;
    }
    let now = k8s_openapi::jiff::Timestamp::now();
    [
        "anthropic-ratelimit-requests-reset",
        "anthropic-ratelimit-tokens-reset",
        "anthropic-ratelimit-input-tokens-reset",
        "anthropic-ratelimit-output-tokens-reset",
    ]
    .iter()
    .filter_map(|name| text(name).and_then(|v| v.parse::<k8s_openapi::jiff::Timestamp>().ok()))
    .filter_map(|at| Duration::try_from(at.duration_since(now)).ok())
    .map(|d| d.min(Duration::from_secs(3600)))
    .max()
    .unwrap_or(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> hyper::HeaderMap {
        let mut h = hyper::HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().expect("valid header"));
        }
        h
    }

    #[test]
    fn retry_after_reads_every_header_providers_use() {
        assert_eq!(
            retry_after(&headers(&[("retry-after", "2")])),
            Duration::from_secs(2)
        );
        assert_eq!(
            retry_after(&headers(&[("retry-after-ms", "250")])),
            Duration::from_millis(250)
        );
        assert_eq!(
            retry_after(&headers(&[("x-ms-retry-after-ms", "1500")])),
            Duration::from_millis(1500)
        );
        assert_eq!(
            retry_after(&headers(&[
                ("x-ratelimit-reset-requests", "1s"),
                ("x-ratelimit-reset-tokens", "6m0s")
            ])),
            Duration::from_secs(360)
        );
        assert_eq!(
            retry_after(&headers(&[("retry-after-ms", "100"), ("retry-after", "9")])),
            Duration::from_millis(100)
        );
        assert_eq!(retry_after(&headers(&[])), Duration::from_secs(1));
        let future =
            httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(30));
        let d = retry_after(&headers(&[("retry-after", &future)]));
        assert!(
            d > Duration::from_secs(28) && d <= Duration::from_secs(30),
            "{d:?}"
        );
    }

    #[test]
    fn quota_and_anthropic_reset_headers_are_read() {
        let openai = rate_limits(&headers(&[
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
        let anthropic = rate_limits(&headers(&[
            ("anthropic-ratelimit-tokens-remaining", "5"),
            ("anthropic-ratelimit-tokens-limit", "80000"),
        ]));
        assert_eq!(anthropic.remaining_tokens, Some(5));
        assert_eq!(anthropic.limit_tokens, Some(80000));

        let reset = (k8s_openapi::jiff::Timestamp::now()
            + k8s_openapi::jiff::SignedDuration::from_secs(20))
        .to_string();
        let d = retry_after(&headers(&[("anthropic-ratelimit-requests-reset", &reset)]));
        assert!(
            d > Duration::from_secs(18) && d <= Duration::from_secs(20),
            "{d:?}"
        );
    }

    #[test]
    fn anthropic_overload_is_a_503_with_an_openai_error_body() {
        let body =
            br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
        let (status, parsed) = error(ProviderType::Anthropic, 529, body);
        assert_eq!(status, 503);
        assert_eq!(
            parsed.and_then(|v| v.pointer("/error/type").cloned()),
            Some(Value::from("server_error"))
        );
        assert_eq!(error(ProviderType::Anthropic, 529, b"<html>").0, 503);
        assert_eq!(error(ProviderType::OpenAi, 529, body).0, 529);
    }
}
