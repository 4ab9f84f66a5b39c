//! OpenTelemetry traces, off unless an OTLP endpoint is configured: a server span per
//! client request and a client span per try (continuations of a broken stream included),
//! with the GenAI semantic-convention attributes, exported over OTLP/HTTP.
//!
//! Configured by the standard `OTEL_*` variables (the operator sets them from a pool's
//! `spec.gateway.tracing`). Off, every call here is a branch on `None`: no header is read,
//! nothing is allocated.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::HeaderMap;
use hyper::{Request, Response};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{Span, SpanKind, Status, TraceContextExt, Tracer, TracerProvider};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{HeaderExtractor, HeaderInjector, HttpError};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};

use crate::dialect::{Operation, Usage};
use crate::upstream;
use crds::pool::ProviderType;
use crds::{ProviderConfig, TargetConfig};

/// The variables that turn tracing on: an OTLP endpoint for traces.
const ENDPOINT_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

/// Largest answer read from the trace collector.
const MAX_COLLECTOR_ANSWER: usize = 64 << 10;

/// The process's tracer, or nothing when tracing is off.
#[derive(Debug, Default)]
pub struct Tracing {
    on: Option<On>,
}

#[derive(Debug)]
struct On {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
}

impl Tracing {
    /// Tracing as the `OTEL_*` environment says: on when an OTLP traces endpoint is set
    /// and neither `OTEL_SDK_DISABLED=true` nor `OTEL_TRACES_EXPORTER=none`. Exports run
    /// on `runtime` (the process's control runtime), with `tls` for `https` collectors.
    pub fn from_env(
        runtime: tokio::runtime::Handle,
        tls: rustls::ClientConfig,
    ) -> anyhow::Result<Self> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let endpoint = ENDPOINT_VARS.iter().find_map(|name| var(name));
        let disabled = var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let exporter_none =
            var("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"));
        if disabled || exporter_none {
            return Ok(Self::default());
        }
        let Some(endpoint) = endpoint else {
            return Ok(Self::default());
        };
        // Named in logs and errors by host and port only: a URL may carry credentials.
        let collector = address(&endpoint).map_or_else(
            || "an unparsable URL".to_owned(),
            |(host, port)| format!("{host}:{port}"),
        );
        if let Some(other) = var("OTEL_TRACES_EXPORTER").filter(|v| v != "otlp") {
            anyhow::bail!("OTEL_TRACES_EXPORTER={other}: only `otlp` and `none` are supported");
        }
        for name in [
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ] {
            if let Some(other) = var(name).filter(|v| v != "http/protobuf") {
                anyhow::bail!(
                    "{name}={other}: the gateway exports traces over OTLP/HTTP with protobuf only (`http/protobuf`, usually port 4318)"
                );
            }
        }
        let timeout = Duration::from_secs(10);
        let client = Collector {
            client: upstream::new_client(Duration::from_secs(5), Duration::from_secs(90), tls),
            runtime,
            timeout,
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client)
            .with_timeout(timeout)
            .build()
            .map_err(|e| {
                anyhow::anyhow!("tracing: cannot export to {collector} (OTEL_EXPORTER_OTLP_*): {e}")
            })?;
        let mut resource = Resource::builder();
        if var("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name("switchyard-gateway");
        }
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build();
        let tracer = provider.tracer("switchyard-gateway");
        tracing::info!(%collector, "exporting traces over OTLP/HTTP");
        Ok(Self {
            on: Some(On {
                provider,
                tracer,
                propagator: TraceContextPropagator::new(),
            }),
        })
    }

    /// Whether spans are made at all.
    pub fn is_on(&self) -> bool {
        self.on.is_some()
    }

    /// The span of one client request, a child of the client's `traceparent` if it sent
    /// one.
    pub fn request(&self, headers: &HeaderMap, op: Operation, model: &str) -> RequestSpan {
        let Some(on) = &self.on else {
            return RequestSpan::default();
        };
        let parent = on.propagator.extract(&HeaderExtractor(headers));
        let mut span = on
            .tracer
            .span_builder(format!("{} {model}", operation_name(op)))
            .with_kind(SpanKind::Server)
            .start_with_context(&on.tracer, &parent);
        // Attributes are built only for spans that are kept: an unsampled request pays
        // for its trace context and nothing more.
        let recording = span.is_recording();
        if recording {
            span.set_attributes([
                KeyValue::new("gen_ai.operation.name", operation_name(op)),
                KeyValue::new("gen_ai.request.model", model.to_owned()),
            ]);
        }
        RequestSpan(Some(Arc::new(Traced {
            cx: parent.with_span(span),
            recording,
        })))
    }

    /// The span of one try of `target` on `provider`, a child of `request`.
    pub fn try_span(
        &self,
        request: &RequestSpan,
        op: Operation,
        provider: &ProviderConfig,
        target: &TargetConfig,
        public_model: &str,
        continuation: bool,
    ) -> TrySpan {
        let (Some(on), Some(parent)) = (&self.on, &request.0) else {
            return TrySpan::default();
        };
        let model = target
            .deployment
            .as_deref()
            .or(target.upstream_model.as_deref())
            .unwrap_or(public_model);
        let mut span = on
            .tracer
            .span_builder(format!("{} {model}", operation_name(op)))
            .with_kind(SpanKind::Client)
            .start_with_context(&on.tracer, &parent.cx);
        let recording = span.is_recording();
        if recording {
            span.set_attributes([
                KeyValue::new("gen_ai.operation.name", operation_name(op)),
                KeyValue::new(
                    "gen_ai.provider.name",
                    provider_name(provider.provider_type),
                ),
                KeyValue::new("gen_ai.request.model", model.to_owned()),
                KeyValue::new("switchyard.provider", provider.name.clone()),
                KeyValue::new("switchyard.provider.region", provider.region.clone()),
            ]);
            if let Some((host, port)) = address(&provider.endpoint) {
                span.set_attribute(KeyValue::new("server.address", host));
                span.set_attribute(KeyValue::new("server.port", port));
            }
            if continuation {
                span.set_attribute(KeyValue::new("switchyard.continuation", true));
            }
        }
        TrySpan(Some(Arc::new(TryState {
            traced: Traced {
                cx: parent.cx.with_span(span),
                recording,
            },
            model: if recording {
                model.to_owned()
            } else {
                String::new()
            },
        })))
    }

    /// Puts `span`'s `traceparent` on an upstream request.
    pub fn inject(&self, span: &TrySpan, headers: &mut HeaderMap) {
        if let (Some(on), Some(state)) = (&self.on, &span.0) {
            on.propagator
                .inject_context(&state.traced.cx, &mut HeaderInjector(headers));
        }
    }

    /// Exports what is queued and stops; blocks, so call it off the runtime.
    pub fn shutdown(&self) {
        if let Some(on) = &self.on
            && let Err(e) = on.provider.shutdown()
        {
            tracing::warn!(error = %e, "traces still queued at shutdown were not all exported");
        }
    }
}

/// A client request's span; ends when the last holder lets go (for a stream, when the
/// stream ends). Cloning is cheap, and free when tracing is off.
#[derive(Debug, Clone, Default)]
pub struct RequestSpan(Option<Arc<Traced>>);

/// A span in its context, and whether it is kept (sampled).
#[derive(Debug)]
struct Traced {
    cx: Context,
    recording: bool,
}

impl Traced {
    /// The span, if anything set on it is kept.
    fn span(&self) -> Option<opentelemetry::trace::SpanRef<'_>> {
        self.recording.then(|| self.cx.span())
    }
}

impl RequestSpan {
    /// What the client got: `provider` answered (empty if none did) after `tries`
    /// tries, with `status`; a status of 400 or more is the span's `error.type`.
    pub fn finished(&self, provider: &str, status: u16, tries: u32) {
        if let Some(span) = self.0.as_deref().and_then(Traced::span) {
            if !provider.is_empty() {
                span.set_attribute(KeyValue::new("switchyard.provider", provider.to_owned()));
            }
            span.set_attribute(KeyValue::new("switchyard.attempts", i64::from(tries)));
            span.set_attribute(KeyValue::new(
                "http.response.status_code",
                i64::from(status),
            ));
            if status >= 400 {
                span.set_attribute(KeyValue::new("error.type", status.to_string()));
                span.set_status(Status::error(status.to_string()));
            }
        }
    }

    /// The model that answered, as the provider was asked for it.
    pub fn response_model(&self, model: &str) {
        if let Some(span) = self.0.as_deref().and_then(Traced::span) {
            span.set_attribute(KeyValue::new("gen_ai.response.model", model.to_owned()));
        }
    }

    /// Tokens the answer used.
    pub fn usage(&self, usage: Usage) {
        if let Some(span) = self.0.as_deref().and_then(Traced::span) {
            set_usage(&span, usage);
        }
    }

    /// The stream broke and could not be resumed.
    pub fn interrupted(&self) {
        if let Some(span) = self.0.as_deref().and_then(Traced::span) {
            span.set_attribute(KeyValue::new("error.type", "stream_interrupted"));
            span.set_status(Status::error("stream_interrupted"));
        }
    }
}

/// A try's span; ends when the last holder lets go (for a stream, when it ends or
/// breaks).
#[derive(Debug, Clone, Default)]
pub struct TrySpan(Option<Arc<TryState>>);

#[derive(Debug)]
struct TryState {
    traced: Traced,
    /// The model the provider was asked for.
    model: String,
}

impl TrySpan {
    /// The try failed: `kind` is its class (as the attempts metric names it), `why` the
    /// gateway's own words (never a provider's body or a key), empty if none.
    pub fn failed(&self, kind: &str, why: &str) {
        if let Some(state) = &self.0
            && let Some(span) = state.traced.span()
        {
            span.set_attribute(KeyValue::new("error.type", kind.to_owned()));
            if !why.is_empty() {
                span.set_attribute(KeyValue::new("switchyard.failover.reason", why.to_owned()));
            }
            span.set_status(Status::error(kind.to_owned()));
        }
    }

    /// The provider's response headers arrived with `status`.
    pub fn status(&self, status: u16) {
        if let Some(span) = self.0.as_ref().and_then(|s| s.traced.span()) {
            span.set_attribute(KeyValue::new(
                "http.response.status_code",
                i64::from(status),
            ));
        }
    }

    /// The try answered: its model and tokens, also set on the request's span.
    pub fn answered(&self, request: &RequestSpan, usage: Option<Usage>) {
        if let Some(state) = &self.0
            && let Some(span) = state.traced.span()
        {
            span.set_attribute(KeyValue::new("gen_ai.response.model", state.model.clone()));
            if let Some(usage) = usage {
                set_usage(&span, usage);
                request.usage(usage);
            }
            request.response_model(&state.model);
        }
    }
}

fn set_usage(span: &opentelemetry::trace::SpanRef<'_>, usage: Usage) {
    span.set_attribute(KeyValue::new(
        "gen_ai.usage.input_tokens",
        i64::try_from(usage.input).unwrap_or(i64::MAX),
    ));
    span.set_attribute(KeyValue::new(
        "gen_ai.usage.output_tokens",
        i64::try_from(usage.output).unwrap_or(i64::MAX),
    ));
}

/// `gen_ai.operation.name` of an operation.
fn operation_name(op: Operation) -> &'static str {
    match op {
        Operation::ChatCompletions => "chat",
        Operation::Completions => "text_completion",
        Operation::Embeddings => "embeddings",
    }
}

/// `gen_ai.provider.name`: the semantic conventions' well-known values, and a name of
/// our own for servers that only speak OpenAI's API.
fn provider_name(t: ProviderType) -> &'static str {
    match t {
        ProviderType::OpenAi => "openai",
        ProviderType::AzureOpenAi => "azure.ai.openai",
        ProviderType::Anthropic => "anthropic",
        ProviderType::OpenAiCompatible => "openai_compatible",
    }
}

/// Host and port of an endpoint URL.
fn address(endpoint: &str) -> Option<(String, i64)> {
    let uri: hyper::Uri = endpoint.parse().ok()?;
    let host = uri.host()?.to_owned();
    let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
        Some("http") => 80,
        _ => 443,
    });
    Some((host, i64::from(port)))
}

/// Sends OTLP batches with the gateway's own HTTP client, on the control runtime (the
/// batch processor calls from a thread of its own), bounded in time and answer size like
/// any upstream.
#[derive(Debug)]
struct Collector {
    client: upstream::HttpClient,
    runtime: tokio::runtime::Handle,
    timeout: Duration,
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for Collector {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let client = self.client.clone();
        let timeout = self.timeout;
        let task = self.runtime.spawn(async move {
            let exchange = async {
                let resp = client.request(request.map(Full::new)).await?;
                let (parts, body) = resp.into_parts();
                let body = Limited::new(body, MAX_COLLECTOR_ANSWER)
                    .collect()
                    .await?
                    .to_bytes();
                Ok::<_, HttpError>(Response::from_parts(parts, body))
            };
            match tokio::time::timeout(timeout, exchange).await {
                Ok(result) => result,
                Err(_) => Err(format!("the collector did not answer within {timeout:?}").into()),
            }
        });
        task.await?
    }
}
