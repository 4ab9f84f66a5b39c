//! A fake LLM provider for tests, the demo and benchmarks.
//!
//! Speaks the OpenAI wire format (`/v1/chat/completions`, `/v1/completions`,
//! `/v1/embeddings`, `/v1/models`, streaming and not), Azure OpenAI's deployment paths,
//! and Anthropic's Messages API (`/v1/messages`, with its event stream).
//! Faults are switched at run time through a small admin API and apply to every request,
//! or only to one model, for a number of requests or until cleared:
//!
//! ```text
//! POST   /admin/faults    {"fault": "status:503", "model": "gpt-4o", "times": 2}
//! DELETE /admin/faults
//! GET    /admin/connections  {"open": N}, client connections open now
//! GET    /admin/attempts  the requests seen (the latest 10,000), in order, with the fault applied
//! POST   /admin/reset     clears faults and attempts
//! POST   /v1/traces       an OTLP/HTTP trace export: answered 200 and dropped
//! ```
//!
//! Fault specs: `status:<code>[:retry-after=<s>|:retry-after-ms=<ms>|:reset-requests=<dur>]`,
//! `reset` (connection closed before headers), `hang` (no response at all),
//! `slow-first-byte:<ms>`, `cut-after:<chunks>`, `stall-after:<chunks>`,
//! `malformed-after:<chunks>`, `no-done`, `context-length`, `content-policy`,
//! `comments:<ms>` (a 200 stream of nothing but `: keep-alive` comments, one every ms),
//! `comments-after:<chunks>` (then only comments), `slow:<ms>` (a word every ms),
//! `huge:<bytes>` (a non-streamed answer of that size, chunked, no length),
//! With `--tls-dir DIR` it serves HTTPS (HTTP/2 or HTTP/1.1 by ALPN) with a certificate
//! for 127.0.0.1 and localhost, signed by a throwaway CA written to `DIR/ca.pem`.
//!
//! `flap:<down-ms>` (503 for that long after the fault is set, then healthy),
//! `error-after:<chunks>` (Anthropic only: an `overloaded_error` event mid-stream),
//! `no-prefill` (a 400 for a request that asks to continue a final assistant message,
//! as a server without continuation support answers; other requests are served),
//! `quota:<remaining>:<limit>` (a normal answer whose `x-ratelimit-*-tokens` headers say
//! so).
//! On `/v1/messages` every fault takes Anthropic's shape: `status:529` is
//! `overloaded_error`, `context-length` is "prompt is too long", `content-policy` is a
//! `refusal` stop reason.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

mod anthropic;
mod tls;

type Body = BoxBody<Bytes, std::io::Error>;

const MAX_ATTEMPTS: usize = 10_000;

#[derive(Debug, Clone)]
struct FaultRule {
    spec: String,
    model: Option<String>,
    remaining: Option<u64>,
    set_at: Instant,
}

#[derive(Debug, Default)]
struct State {
    name: String,
    models: Vec<String>,
    faults: Vec<FaultRule>,
    /// The latest [`MAX_ATTEMPTS`] attempts; a benchmark's millions are not kept.
    attempts: std::collections::VecDeque<Value>,
    seen: u64,
}

#[derive(Debug, Clone)]
struct Fake {
    state: Arc<Mutex<State>>,
    started: Instant,
    /// Client connections open now (`GET /admin/connections`).
    connections: Arc<std::sync::atomic::AtomicUsize>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut listen: SocketAddr = "127.0.0.1:0".parse()?;
    let mut name = "fake".to_owned();
    let mut models = Vec::new();
    let mut faults = Vec::new();
    let mut tls_dir = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| anyhow::anyhow!("{arg} needs a value"))
        };
        match arg.as_str() {
            "--listen" => listen = value()?.parse()?,
            "--name" => name = value()?,
            "--models" => models = value()?.split(',').map(str::to_owned).collect(),
            "--fault" => faults.push(value()?),
            "--tls-dir" => tls_dir = Some(std::path::PathBuf::from(value()?)),
            other => anyhow::bail!("unknown argument {other}; see the module docs"),
        }
    }
    let started = Instant::now();
    let fake = Fake {
        state: Arc::new(Mutex::new(State {
            name: name.clone(),
            models,
            faults: faults
                .into_iter()
                .map(|spec| FaultRule {
                    spec,
                    model: None,
                    remaining: None,
                    set_at: started,
                })
                .collect(),
            attempts: std::collections::VecDeque::new(),
            seen: 0,
        })),
        started,
        connections: Arc::default(),
    };
    let tls = tls_dir.as_deref().map(tls::acceptor).transpose()?;
    let listener = TcpListener::bind(listen).await?;
    // The first line tells the launcher where to connect.
    println!(
        "fake-provider {name} listening on {}://{}",
        if tls.is_some() { "https" } else { "http" },
        listener.local_addr()?
    );
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let fake = fake.clone();
        let tls = tls.clone();
        let open = fake.connections.clone();
        open.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tokio::spawn(async move {
            let _open = OpenConnection(open);
            let service = hyper::service::service_fn(move |req| {
                let fake = fake.clone();
                async move { fake.handle(req).await }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            match tls {
                Some(acceptor) => {
                    if let Ok(stream) = acceptor.accept(stream).await {
                        let _ = builder
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    }
                }
                None => {
                    let _ = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                }
            }
        });
    }
}

/// Counts a connection as open until dropped.
struct OpenConnection(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

fn full(status: StatusCode, body: Value) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn error(status: StatusCode, kind: &str, code: &str, message: &str) -> Response<Body> {
    full(
        status,
        json!({"error": {"message": message, "type": kind, "code": code, "param": null}}),
    )
}

/// The error a `reset` fault produces: hyper closes the connection without a response.
#[derive(Debug)]
struct Reset;
impl std::fmt::Display for Reset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection reset by fault injection")
    }
}
impl std::error::Error for Reset {}

impl Fake {
    async fn handle(&self, req: Request<Incoming>) -> Result<Response<Body>, Reset> {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let query = req.uri().query().unwrap_or_default().to_owned();
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let headers = json!({
            "authorization": header("authorization").map(|v| if v.starts_with("Bearer ") { "Bearer <redacted>" } else { "<malformed>" }),
            "api-key": header("api-key").map(|_| "<redacted>"),
            "x-api-key": header("x-api-key").map(|_| "<redacted>"),
            "anthropic-version": header("anthropic-version"),
            "x-request-id": header("x-request-id"),
            "traceparent": header("traceparent"),
        });
        let version = format!("{:?}", req.version());
        let req_headers = req.headers().clone();
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);

        if path.starts_with("/admin/") {
            return Ok(self.admin(&method, &path, &request));
        }
        if method == Method::POST && path == "/v1/traces" {
            // A sink for OTLP trace exports (the bench points a gateway's tracing here):
            // accepted with the empty answer a collector gives, and not kept.
            let mut resp = Response::new(
                Full::new(Bytes::new())
                    .map_err(|never: Infallible| match never {})
                    .boxed(),
            );
            resp.headers_mut().insert(
                "content-type",
                hyper::header::HeaderValue::from_static("application/x-protobuf"),
            );
            return Ok(resp);
        }

        // Azure: /openai/deployments/{deployment}/chat/completions?api-version=...
        let (endpoint, deployment) = match path.strip_prefix("/openai/deployments/") {
            Some(rest) => match rest.split_once('/') {
                Some((deployment, op)) => (format!("/v1/{op}"), Some(deployment.to_owned())),
                None => (path.clone(), None),
            },
            None => (path.clone(), None),
        };
        let model = deployment
            .clone()
            .or_else(|| {
                request
                    .get("model")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        let stream = request
            .get("stream")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let fault = self.take_fault(&model);
        {
            let mut state = self.state.lock().map_err(|_| Reset)?;
            let seq = state.seen;
            state.seen += 1;
            if state.attempts.len() == MAX_ATTEMPTS {
                state.attempts.pop_front();
            }
            state.attempts.push_back(json!({
                "seq": seq,
                "atMs": u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
                "method": method.as_str(),
                "path": path,
                "query": query,
                "model": model,
                "stream": stream,
                "headers": headers,
                "version": version,
                "fault": fault,
                "body": request,
                "raw": String::from_utf8_lossy(&body),
            }));
        }
        if deployment.is_some() && !query.contains("api-version=") {
            return Ok(error(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "404",
                "api-version query parameter is missing",
            ));
        }

        let fault = fault.unwrap_or_default();
        let (kind, arg) = fault.split_once(':').unwrap_or((fault.as_str(), ""));
        match kind {
            "reset" => return Err(Reset),
            "hang" => std::future::pending::<()>().await,
            "slow-first-byte" => {
                tokio::time::sleep(Duration::from_millis(arg.parse().unwrap_or(1000))).await
            }
            _ => {}
        }
        if method == Method::POST && endpoint == "/v1/messages" {
            return Ok(self.messages(&req_headers, &request, &model, stream, kind, arg));
        }
        if kind == "no-prefill" && continues(&request) {
            // How an OpenAI-compatible server without continuation support answers.
            return Ok(error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "400",
                "Unrecognized request argument supplied: continue_final_message",
            ));
        }
        match kind {
            "status" => return Ok(status_fault(arg)),
            "flap" => {
                return Ok(error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    "503",
                    "flapping: down",
                ));
            }
            "context-length" => {
                return Ok(error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    "context_length_exceeded",
                    "This model's maximum context length is 8192 tokens. However, your messages resulted in 9000 tokens.",
                ));
            }
            "content-policy" => {
                let code = if deployment.is_some() {
                    "content_filter"
                } else {
                    "content_policy_violation"
                };
                return Ok(error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    code,
                    "Your request was rejected as a result of our safety system.",
                ));
            }
            _ => {}
        }

        let name = self.name();
        let mut resp = match (method, endpoint.as_str()) {
            (Method::GET, "/v1/models") => {
                let models = self
                    .state
                    .lock()
                    .map(|s| s.models.clone())
                    .unwrap_or_default();
                let data: Vec<Value> = models
                    .iter()
                    .map(|m| json!({"id": m, "object": "model", "owned_by": name}))
                    .collect();
                full(StatusCode::OK, json!({"object": "list", "data": data}))
            }
            (Method::POST, "/v1/chat/completions") if stream => {
                stream_chat(&name, &model, &request, kind, arg)
            }
            (Method::POST, "/v1/chat/completions") if kind == "huge" => {
                huge_answer(&name, &model, arg.parse().unwrap_or(64 << 20))
            }
            (Method::POST, "/v1/chat/completions") => {
                let text = answer(&name, &request);
                let cut = kind == "cut-after";
                let body = json!({
                    "id": format!("chatcmpl-{name}"),
                    "object": "chat.completion",
                    "created": 1_700_000_000,
                    "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                    "usage": usage(&request, &text),
                });
                if cut {
                    cut_body(body)
                } else {
                    full(StatusCode::OK, body)
                }
            }
            (Method::POST, "/v1/completions") => {
                let text = answer(&name, &request);
                full(
                    StatusCode::OK,
                    json!({"id": format!("cmpl-{name}"), "object": "text_completion", "created": 1_700_000_000, "model": model,
                           "choices": [{"index": 0, "text": text, "finish_reason": "stop"}], "usage": usage(&request, &text)}),
                )
            }
            (Method::POST, "/v1/embeddings") => full(
                StatusCode::OK,
                json!({"object": "list", "model": model,
                       "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3, 0.4]}],
                       "usage": {"prompt_tokens": 3, "total_tokens": 3}}),
            ),
            _ => error(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "unknown_url",
                &format!("no route {endpoint}"),
            ),
        };
        let headers = resp.headers_mut();
        headers.insert(
            "x-ratelimit-remaining-requests",
            hyper::header::HeaderValue::from_static("999"),
        );
        headers.insert(
            "x-ratelimit-remaining-tokens",
            hyper::header::HeaderValue::from_static("99999"),
        );
        if kind == "quota"
            && let Some((remaining, limit)) = arg.split_once(':')
            && let (Ok(r), Ok(l)) = (
                hyper::header::HeaderValue::from_str(remaining),
                hyper::header::HeaderValue::from_str(limit),
            )
        {
            headers.insert("x-ratelimit-remaining-tokens", r);
            headers.insert("x-ratelimit-limit-tokens", l);
        }
        if let Ok(v) = hyper::header::HeaderValue::from_str(&name) {
            headers.insert("x-fake-provider", v);
        }
        Ok(resp)
    }

    /// Anthropic's Messages API, faults in its shape.
    fn messages(
        &self,
        headers: &hyper::HeaderMap,
        request: &Value,
        model: &str,
        stream: bool,
        kind: &str,
        arg: &str,
    ) -> Response<Body> {
        if let Some(refused) = anthropic::invalid(headers, request) {
            return refused;
        }
        match kind {
            "status" | "flap" => {
                let mut resp = status_fault(if kind == "flap" { "529" } else { arg });
                let code = resp.status().as_u16();
                let (error_type, message) = match code {
                    429 => (
                        "rate_limit_error",
                        "Number of requests has exceeded your rate limit",
                    ),
                    529 => ("overloaded_error", "Overloaded"),
                    401 => ("authentication_error", "invalid x-api-key"),
                    500..=599 => ("api_error", "Internal server error"),
                    _ => ("invalid_request_error", "fault injected"),
                };
                let headers = resp.headers().clone();
                resp = anthropic::error(resp.status(), error_type, message);
                resp.headers_mut().extend(
                    headers
                        .into_iter()
                        .filter_map(|(k, v)| k.filter(|k| k != "content-type").map(|k| (k, v))),
                );
                return resp;
            }
            "context-length" => {
                return anthropic::error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    "prompt is too long: 9000 tokens > 8192 maximum",
                );
            }
            _ => {}
        }
        let name = self.name();
        let text = answer(&name, &anthropic::as_openai_messages(request));
        let mut resp = if stream {
            anthropic::stream(&name, model, request, &text, kind, arg)
        } else {
            let message =
                anthropic::message(&name, model, request, &text, kind == "content-policy");
            if kind == "cut-after" {
                cut_body(message)
            } else {
                full(StatusCode::OK, message)
            }
        };
        resp.headers_mut().insert(
            "anthropic-ratelimit-requests-remaining",
            hyper::header::HeaderValue::from_static("999"),
        );
        resp
    }

    fn name(&self) -> String {
        self.state
            .lock()
            .map(|s| s.name.clone())
            .unwrap_or_default()
    }

    /// The first rule matching `model` (or every model); decrements its count.
    fn take_fault(&self, model: &str) -> Option<String> {
        let mut state = self.state.lock().ok()?;
        let idx = state
            .faults
            .iter()
            .position(|f| f.model.as_deref().is_none_or(|m| m == model))?;
        let rule = state.faults[idx].clone();
        if let Some(down_ms) = rule.spec.strip_prefix("flap:") {
            let down = Duration::from_millis(down_ms.parse().unwrap_or(1000));
            if rule.set_at.elapsed() >= down {
                state.faults.remove(idx);
                return None;
            }
        }
        if let Some(n) = state.faults[idx].remaining.as_mut() {
            *n = n.saturating_sub(1);
            if *n == 0 {
                state.faults.remove(idx);
            }
        }
        Some(rule.spec)
    }

    fn admin(&self, method: &Method, path: &str, request: &Value) -> Response<Body> {
        let Ok(mut state) = self.state.lock() else {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "500",
                "state poisoned",
            );
        };
        match (method, path) {
            (&Method::POST, "/admin/faults") => {
                let Some(spec) = request.get("fault").and_then(Value::as_str) else {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "invalid_request_error",
                        "400",
                        "body needs {\"fault\": \"...\"}",
                    );
                };
                state.faults.push(FaultRule {
                    spec: spec.to_owned(),
                    model: request
                        .get("model")
                        .and_then(Value::as_str)
                        .map(str::to_owned),
                    remaining: request.get("times").and_then(Value::as_u64),
                    set_at: Instant::now(),
                });
                full(StatusCode::OK, json!({"faults": state.faults.len()}))
            }
            (&Method::DELETE, "/admin/faults") => {
                state.faults.clear();
                full(StatusCode::OK, json!({"faults": 0}))
            }
            (&Method::GET, "/admin/connections") => full(
                StatusCode::OK,
                json!({"open": self.connections.load(std::sync::atomic::Ordering::Relaxed)}),
            ),
            (&Method::GET, "/admin/attempts") => full(
                StatusCode::OK,
                Value::Array(state.attempts.iter().cloned().collect()),
            ),
            (&Method::POST, "/admin/reset") => {
                state.faults.clear();
                state.attempts.clear();
                state.seen = 0;
                full(StatusCode::OK, json!({}))
            }
            _ => error(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "404",
                "unknown admin path",
            ),
        }
    }
}

fn status_fault(arg: &str) -> Response<Body> {
    let mut parts = arg.split(':');
    let code = parts.next().and_then(|c| c.parse().ok()).unwrap_or(500u16);
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let kind = if code == 429 {
        "rate_limit_error"
    } else if code >= 500 {
        "server_error"
    } else {
        "invalid_request_error"
    };
    let mut resp = error(
        status,
        kind,
        &code.to_string(),
        &format!("fault injected: {code}"),
    );
    for part in parts {
        if let Some((key, value)) = part.split_once('=') {
            let name = match key {
                "retry-after" => "retry-after",
                "retry-after-ms" => "retry-after-ms",
                "reset-requests" => "x-ratelimit-reset-requests",
                "reset-tokens" => "x-ratelimit-reset-tokens",
                _ => continue,
            };
            if let Ok(v) = hyper::header::HeaderValue::from_str(value) {
                resp.headers_mut().insert(name, v);
            }
        }
    }
    resp
}

/// Whether `request` asks to continue its final assistant message.
fn continues(request: &Value) -> bool {
    request.get("continue_final_message").is_some()
        || request
            .get("messages")
            .and_then(Value::as_array)
            .and_then(|m| m.last())
            .and_then(|m| m.get("role"))
            .and_then(Value::as_str)
            == Some("assistant")
}

/// The canned answer. A request whose last message is an assistant prefix of it (a
/// continuation of a cut stream) gets the rest.
fn answer(name: &str, request: &Value) -> String {
    let full = format!("Hello from {name}. The quick brown fox jumps over the lazy dog.");
    let last = request
        .get("messages")
        .and_then(Value::as_array)
        .and_then(|m| m.last());
    let prefill = last
        .filter(|m| m.get("role").and_then(Value::as_str) == Some("assistant"))
        .and_then(|m| m.get("content").and_then(Value::as_str));
    // Another provider's partial answer ("Hello from alpha. The quick ") is continued
    // from the shared sentence, so a resumed stream reads as one answer.
    let tail = |s: &str| {
        s.split_once(". ")
            .map(|(_, t)| t.to_owned())
            .unwrap_or_default()
    };
    match prefill {
        Some(p) if full.starts_with(p) => full[p.len()..].to_owned(),
        Some(p) if p.starts_with("Hello from ") && tail(&full).starts_with(&tail(p)) => {
            tail(&full)[tail(p).len()..].to_owned()
        }
        _ => full,
    }
}

fn usage(request: &Value, text: &str) -> Value {
    let prompt = request.to_string().split_whitespace().count();
    let completion = text.split_whitespace().count();
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// A complete JSON body declared in full, then cut off half way.
fn cut_body(body: Value) -> Response<Body> {
    let bytes = Bytes::from(body.to_string());
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
    let half = bytes.slice(..bytes.len() / 2);
    tokio::spawn(async move {
        let _ = tx.send(Ok(Frame::data(half))).await;
        let _ = tx
            .send(Err(std::io::Error::other("cut by fault injection")))
            .await;
    });
    let mut resp = streamed(rx, "application/json");
    if let Ok(v) = hyper::header::HeaderValue::from_str(&bytes.len().to_string()) {
        resp.headers_mut().insert("content-length", v);
    }
    resp
}

/// A well-formed answer of about `bytes` bytes, sent in chunks without a length, as a
/// provider gone wrong (or a hostile one) would.
fn huge_answer(name: &str, model: &str, bytes: usize) -> Response<Body> {
    const PIECE: usize = 64 << 10;
    static FILLER: [u8; PIECE] = [b'a'; PIECE];
    let head = format!(
        r#"{{"id":"chatcmpl-{name}","object":"chat.completion","created":1700000000,"model":"{model}","choices":[{{"index":0,"message":{{"role":"assistant","content":""#
    );
    let tail = r#""},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#;
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
    tokio::spawn(async move {
        if tx.send(Ok(Frame::data(Bytes::from(head)))).await.is_err() {
            return;
        }
        let mut left = bytes;
        while left > 0 {
            let n = left.min(PIECE);
            if tx
                .send(Ok(Frame::data(Bytes::from_static(&FILLER[..n]))))
                .await
                .is_err()
            {
                return;
            }
            left -= n;
        }
        let _ = tx
            .send(Ok(Frame::data(Bytes::from_static(tail.as_bytes()))))
            .await;
    });
    streamed(rx, "application/json")
}

fn stream_chat(name: &str, model: &str, request: &Value, fault: &str, arg: &str) -> Response<Body> {
    let text = answer(name, request);
    let words: Vec<String> = text.split_inclusive(' ').map(str::to_owned).collect();
    let include_usage = request
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let usage = usage(request, &text);
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(16);
    let at: usize = arg.parse().unwrap_or(2);
    let fault = fault.to_owned();
    let id = format!("chatcmpl-{name}");
    let model = model.to_owned();
    let pace = Duration::from_millis(if fault == "slow" {
        arg.parse().unwrap_or(500)
    } else {
        1
    });
    let comment_every = Duration::from_millis(arg.parse().unwrap_or(2000));
    tokio::spawn(async move {
        if fault == "comments" {
            keep_alive_forever(&tx, comment_every).await;
            return;
        }
        let chunk = |delta: Value, finish: Option<&str>| {
            let v = json!({"id": id, "object": "chat.completion.chunk", "created": 1_700_000_000, "model": model,
                           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
            Ok(Frame::data(Bytes::from(format!("data: {v}\n\n"))))
        };
        if tx
            .send(chunk(json!({"role": "assistant", "content": ""}), None))
            .await
            .is_err()
        {
            return;
        }
        for (i, word) in words.iter().enumerate() {
            if i == at && stream_fault(&tx, &fault, b"data: {\"choices\": [{\"delta\": \n\n").await
            {
                return;
            }
            if tx
                .send(chunk(json!({"content": word}), None))
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(pace).await;
        }
        let _ = tx.send(chunk(json!({}), Some("stop"))).await;
        if include_usage {
            let v = json!({"id": id, "object": "chat.completion.chunk", "created": 1_700_000_000, "model": model,
                           "choices": [], "usage": usage});
            let _ = tx
                .send(Ok(Frame::data(Bytes::from(format!("data: {v}\n\n")))))
                .await;
        }
        if fault != "no-done" {
            let _ = tx
                .send(Ok(Frame::data(Bytes::from_static(b"data: [DONE]\n\n"))))
                .await;
        }
    });
    streamed(rx, "text/event-stream")
}

/// Applies a mid-stream fault where it is due: `cut-after` breaks the connection (true: the
/// stream is over), `stall-after` never returns, `malformed-after` sends `garbage` first.
async fn stream_fault(
    tx: &mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>,
    fault: &str,
    garbage: &'static [u8],
) -> bool {
    match fault {
        "cut-after" => {
            let _ = tx
                .send(Err(std::io::Error::other("cut by fault injection")))
                .await;
            true
        }
        "stall-after" => std::future::pending().await,
        "comments-after" => {
            keep_alive_forever(tx, Duration::from_millis(500)).await;
            true
        }
        "malformed-after" => {
            let _ = tx.send(Ok(Frame::data(Bytes::from_static(garbage)))).await;
            false
        }
        _ => false,
    }
}

/// Sends only SSE comments, every `every`, until the reader goes away: a stream that looks
/// alive and never says anything.
async fn keep_alive_forever(
    tx: &mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>,
    every: Duration,
) {
    loop {
        if tx
            .send(Ok(Frame::data(Bytes::from_static(b": keep-alive\n\n"))))
            .await
            .is_err()
        {
            return;
        }
        tokio::time::sleep(every).await;
    }
}

/// A response whose body is what `rx` yields, of `content_type`.
fn streamed(
    rx: mpsc::Receiver<Result<Frame<Bytes>, std::io::Error>>,
    content_type: &'static str,
) -> Response<Body> {
    let mut resp = Response::new(StreamBody::new(tokio_stream(rx)).boxed());
    resp.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static(content_type),
    );
    resp
}

/// Adapts an mpsc receiver to a `Stream` without pulling in tokio-stream.
fn tokio_stream<T>(mut rx: mpsc::Receiver<T>) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
