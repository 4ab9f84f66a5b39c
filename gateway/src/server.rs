//! The HTTP front: HTTP/1.1 and h2c on one port, the OpenAI API, admin endpoints, and a
//! graceful shutdown that finishes requests in flight.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use rand::Rng;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::auth::presented_key;
use crate::body::RequestBody;
use crate::budget::{OverBudget, ReadError, ReadLimits, declared_length, read_body};
use crate::dialect::Operation;
use crate::error::GatewayError;
use crate::gateway::Gateway;
use crate::idempotency::{Claim, MAX_KEY_LEN, Recording, Stored, fingerprint};
use crate::proxy::{ClientRequest, Served, serve};
use crate::response::{Body, json_response, names};
use crate::table::Admission;

/// Largest request head (request line and headers) accepted, in bytes.
const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Largest answer kept for idempotent replay; longer ones are served but not kept.
const MAX_REPLAY_BYTES: usize = 8 << 20;

/// Wait after a failed accept, doubling up to the maximum while failures last.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Concurrent connections to the admin listener (scrapers and people, not traffic).
const ADMIN_CONNECTIONS: usize = 16;

/// Before the drain deadline, how long streams get to send their interruption event.
const STREAM_STOP_GRACE: Duration = Duration::from_secs(1);

/// HTTP/2 pings: a peer that does not answer one within this long is dropped.
const H2_KEEP_ALIVE: Duration = Duration::from_secs(20);

/// The body of the answer to a connection beyond `--max-connections`.
const TOO_MANY_CONNECTIONS: &str = r#"{"error":{"message":"this gateway replica is at its connection limit; retry shortly","type":"server_error","code":"too_many_connections"}}"#;

/// How a gateway stops.
#[derive(Debug, Clone, Copy)]
pub struct Shutdown {
    /// After the signal, how long to keep accepting and serving while load balancers stop
    /// sending here (in Kubernetes the pod leaves its Service's endpoints because it is
    /// terminating; `/readyz` also answers 503, for balancers that only probe).
    /// HTTP/1.x responses then carry `Connection: close`, so keep-alive clients reconnect
    /// elsewhere on their own instead of racing a close of their idle connection.
    pub delay: Duration,
    /// Then, how long requests in flight may take to finish.
    pub drain: Duration,
}

/// `count` listeners on `addr` sharing its port through `SO_REUSEPORT`, so each serving
/// thread accepts its own connections and the kernel spreads new ones between them. An
/// ephemeral port (`:0`) is chosen by the first and reused by the others.
pub fn bind_shared(addr: SocketAddr, count: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    use socket2::{Domain, Protocol, Socket, Type};
    let mut addr = addr;
    let mut listeners = Vec::with_capacity(count);
    for _ in 0..count.max(1) {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        let listener: std::net::TcpListener = socket.into();
        addr = listener.local_addr()?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// Serves on `listener` until `signal` resolves, keeps serving (not ready) for
/// `shutdown.delay`, then stops accepting and waits up to `shutdown.drain` for requests
/// in flight. `connections` is the connection cap, shared by every serving thread.
pub async fn run(
    gw: Arc<Gateway>,
    listener: TcpListener,
    connections: Arc<Semaphore>,
    signal: impl std::future::Future<Output = ()>,
    shutdown: Shutdown,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // Bounded headers: a client cannot make the gateway buffer more than this per request
    // (HTTP/1.1 answers 431 beyond it). The timer is what makes hyper enforce the header
    // timeout, which also closes keep-alive connections idle for as long.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(gw.limits.header_timeout)
        .max_buf_size(MAX_HEADER_BYTES)
        .max_headers(128);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(H2_KEEP_ALIVE))
        .keep_alive_timeout(H2_KEEP_ALIVE)
        .max_header_list_size(u32::try_from(MAX_HEADER_BYTES).unwrap_or(u32::MAX));
    let front = Front {
        gw: &gw,
        listener: &listener,
        builder: &builder,
        graceful: &graceful,
        connections: &connections,
    };
    front.accept_until(signal).await;
    if !shutdown.delay.is_zero() {
        gw.draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(
            delay_seconds = shutdown.delay.as_secs(),
            "shutting down: not ready, still serving while endpoints stop sending here"
        );
        front.accept_until(tokio::time::sleep(shutdown.delay)).await;
    }
    drop(listener);
    tracing::info!(
        drain_seconds = shutdown.drain.as_secs(),
        "shutting down: no new connections, finishing requests in flight"
    );
    // Shortly before the deadline, streams still running are told to end with an
    // interruption event, so no client sees a silently truncated answer.
    let grace = (shutdown.drain / 4).min(STREAM_STOP_GRACE);
    let finished = graceful.shutdown();
    tokio::pin!(finished);
    if tokio::time::timeout(shutdown.drain - grace, &mut finished)
        .await
        .is_err()
    {
        tracing::warn!("requests still in flight near the drain deadline; ending their streams");
        gw.stopping.send_replace(true);
        if tokio::time::timeout(grace, &mut finished).await.is_err() {
            tracing::warn!("some requests were still in flight at the drain deadline");
        }
    }
}

/// What accepting a connection needs.
struct Front<'a> {
    gw: &'a Arc<Gateway>,
    listener: &'a TcpListener,
    builder: &'a hyper_util::server::conn::auto::Builder<TokioExecutor>,
    graceful: &'a GracefulShutdown,
    connections: &'a Arc<Semaphore>,
}

impl Front<'_> {
    /// Accepts and serves connections until `until` resolves.
    async fn accept_until(&self, until: impl std::future::Future<Output = ()>) {
        let mut until = std::pin::pin!(until);
        let mut backoff = ACCEPT_BACKOFF_MIN;
        loop {
            tokio::select! {
                accepted = self.listener.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(accepted) => {
                            backoff = ACCEPT_BACKOFF_MIN;
                            accepted
                        }
                        // Out of file descriptors, say: retrying at once would spin a core
                        // and starve the connections already open.
                        Err(e) => {
                            tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "accepting a connection failed");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                            continue;
                        }
                    };
                    let Ok(permit) = self.connections.clone().try_acquire_owned() else {
                        tokio::spawn(refuse(stream));
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let gw = self.gw.clone();
                    let service = hyper::service::service_fn(move |req| {
                        let gw = gw.clone();
                        async move { Ok::<_, Infallible>(handle(gw, req, peer).await) }
                    });
                    let conn = self.builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    let conn = self.graceful.watch(conn.into_owned());
                    tokio::spawn(async move {
                        let _ = conn.await;
                        drop(permit);
                    });
                }
                () = &mut until => break,
            }
        }
    }
}

/// Answers a connection over the cap with a 503 and closes it, without reading from it.
async fn refuse(mut stream: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    tracing::debug!("connection refused: at the connection cap");
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\nretry-after: 1\r\ncontent-length: {}\r\n\r\n{TOO_MANY_CONNECTIONS}",
        TOO_MANY_CONNECTIONS.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(answer.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// The answer when the memory budget has no room for what a request needs buffered.
pub fn over_budget(gw: &Gateway, what: &'static str, e: &OverBudget) -> GatewayError {
    gw.metrics.over_budget(what);
    GatewayError::MemoryBudget(e.to_string())
}

/// Liveness: the process answers.
fn healthz() -> Response<Body> {
    json_response(StatusCode::OK, Bytes::from_static(b"{\"status\":\"ok\"}"))
}

/// `/metrics` and `/status`: what the gateway knows of its providers and routes, for
/// operators, not clients.
fn admin(gw: &Gateway, path: &str) -> Response<Body> {
    if path == "/status" {
        return status(gw);
    }
    let text = gw.metrics.render(gw.table.load().as_deref(), &gw.budget);
    let mut r = json_response(StatusCode::OK, Bytes::from(text));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
    );
    r
}

/// Serves `/metrics`, `/status` and `/healthz` on their own listener (the
/// `--admin-listen` address), kept off the port clients reach. A few connections at a
/// time, with the client port's header timeout.
pub async fn run_admin(gw: Arc<Gateway>, listener: TcpListener) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(gw.limits.header_timeout)
        .max_buf_size(MAX_HEADER_BYTES);
    let slots = Arc::new(Semaphore::new(ADMIN_CONNECTIONS));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(ACCEPT_BACKOFF_MAX).await;
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let gw = gw.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let gw = gw.clone();
            async move {
                let path = req.uri().path();
                let resp = match (req.method(), path) {
                    (&Method::GET, "/metrics" | "/status") => admin(&gw, path),
                    (&Method::GET, "/healthz") => healthz(),
                    _ => GatewayError::UnknownUrl(
                        "the admin port serves /metrics, /status and /healthz".into(),
                    )
                    .response(),
                };
                Ok::<_, Infallible>(resp)
            }
        });
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
}

fn request_id(req: &Request<Incoming>) -> String {
    req.headers()
        .get(&names::X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(fresh_request_id, str::to_owned)
}

/// 32 random hex digits, written without the formatting machinery (this runs for every
/// request that brings no id of its own).
fn fresh_request_id() -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let n = rand::rng().random::<u128>();
    let mut id = [0u8; 32];
    for (i, digit) in id.iter_mut().rev().enumerate() {
        *digit = HEX[((n >> (i * 4)) & 0xf) as usize];
    }
    String::from_utf8_lossy(&id).into_owned()
}

async fn handle(gw: Arc<Gateway>, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    let started = Instant::now();
    let id = request_id(&req);
    let method = req.method().clone();
    let version = req.version();
    let path = req.uri().path().to_owned();
    let mut resp = match (&method, path.as_str()) {
        (&Method::GET, "/healthz") => healthz(),
        (&Method::GET, "/readyz") if gw.draining.load(std::sync::atomic::Ordering::Relaxed) => {
            GatewayError::ShuttingDown.response()
        }
        (&Method::GET, "/readyz") => match gw.table.load().as_ref() {
            Some(_) => json_response(
                StatusCode::OK,
                Bytes::from_static(b"{\"status\":\"ready\"}"),
            ),
            None => GatewayError::NotReady.response(),
        },
        (&Method::GET, "/metrics" | "/status") if !gw.admin_on_api_port => {
            GatewayError::UnknownUrl(format!("unknown path {path}")).response()
        }
        (&Method::GET, "/metrics" | "/status") => admin(&gw, &path),
        (&Method::GET, "/v1/models") => models(&gw, &req),
        (&Method::POST, p) if Operation::from_path(p).is_some() => {
            let op = Operation::from_path(p).unwrap_or(Operation::ChatCompletions);
            api(&gw, req, op, &id)
                .await
                .unwrap_or_else(|e| e.response())
        }
        (_, p) if Operation::from_path(p).is_some() || p == "/v1/models" => {
            GatewayError::MethodNotAllowed {
                method: method.to_string(),
                path: p.to_owned(),
            }
            .response()
        }
        _ => GatewayError::UnknownUrl(format!("unknown path {path}")).response(),
    };
    if let Ok(v) = hyper::header::HeaderValue::from_str(&id) {
        resp.headers_mut().insert(&names::X_REQUEST_ID, v);
    }
    // HTTP/2 clients get a GOAWAY when the drain starts; HTTP/1.x ones are told here.
    if version < hyper::Version::HTTP_2 && gw.draining.load(std::sync::atomic::Ordering::Relaxed) {
        resp.headers_mut().insert(
            hyper::header::CONNECTION,
            hyper::header::HeaderValue::from_static("close"),
        );
    }
    if path.starts_with("/v1/") {
        tracing::info!(
            request_id = %id,
            method = %method,
            path = %path,
            status = resp.status().as_u16(),
            provider = resp.headers().get(&names::X_PROVIDER).and_then(|v| v.to_str().ok()).unwrap_or(""),
            attempts = resp.headers().get(&names::X_ATTEMPTS).and_then(|v| v.to_str().ok()).unwrap_or("0"),
            ms = started.elapsed().as_millis() as u64,
            peer = %peer,
            "request"
        );
    }
    resp
}

async fn api(
    gw: &Arc<Gateway>,
    req: Request<Incoming>,
    op: Operation,
    id: &str,
) -> Result<Response<Body>, GatewayError> {
    let started = Instant::now();
    let table = gw.table.load_full().ok_or(GatewayError::NotReady)?;
    // Without routes there is no key to check and nothing to reveal; say why at once.
    if table.routes().is_empty() {
        return Err(GatewayError::NoRoutes);
    }
    let (parts, body) = req.into_parts();
    // Nothing is read or parsed for a client that no route would serve.
    let admission = table
        .admit(presented_key(&parts.headers))
        .ok_or(GatewayError::InvalidApiKey)?;
    let declared = declared_length(&parts.headers);
    let limits = ReadLimits {
        max: gw.limits.max_body,
        copies: 2,
        timeout: gw.limits.body_timeout,
    };
    let read = read_body(&gw.budget, body, declared, limits).await;
    let (bytes, held) = read.map_err(|e| match e {
        ReadError::TooLarge(_) => GatewayError::BodyTooLarge(gw.limits.max_body),
        ReadError::OverBudget(e) => over_budget(gw, "client_body", &e),
        ReadError::TimedOut(_) => GatewayError::BodyTimeout(gw.limits.body_timeout.as_secs()),
        ReadError::Broken(_) => GatewayError::BodyUnreadable,
    })?;
    let body = RequestBody::parse(bytes)
        .map_err(|e| GatewayError::InvalidJson(e.to_string()))?
        .holding(held);
    let model = body
        .model()
        .map(str::to_owned)
        .ok_or(GatewayError::MissingModel)?;
    let route = table
        .route_for(&model)
        .ok_or_else(|| GatewayError::ModelNotFound(model.clone()))?;
    if let Some(problem) = &route.misconfigured {
        return Err(GatewayError::Misconfigured(problem.clone()));
    }
    let client = match (&route.client_keys, admission) {
        (None, _) => String::new(),
        (
            Some(keys),
            Admission::Client {
                keys: known,
                client,
            },
        ) if Arc::ptr_eq(keys, known) => client.to_owned(),
        (Some(keys), _) => presented_key(&parts.headers)
            .and_then(|k| keys.identify(k))
            .ok_or(GatewayError::InvalidApiKey)?
            .to_owned(),
    };
    if !route.config.allows(&client, &model) {
        return Err(GatewayError::ModelNotAllowed { client, model });
    }
    let lease = match idempotency_key(&parts.headers) {
        Err(()) => return Err(GatewayError::InvalidIdempotencyKey(MAX_KEY_LEN)),
        Ok(Some(key)) if !route.config.idempotency_window.get().is_zero() => {
            let wait_until = started + route.config.timeouts.total.get();
            match gw
                .replays
                .claim(
                    &client,
                    key,
                    fingerprint(parts.uri.path(), body.raw()),
                    route.config.idempotency_window.get(),
                    wait_until,
                )
                .await
            {
                Claim::Lead(lease) => Some(lease),
                Claim::Replay(stored) => {
                    route.metrics(&gw.metrics).idempotent_replay();
                    return Ok(replay(&stored));
                }
                Claim::Mismatch => return Err(GatewayError::IdempotencyKeyReused),
                Claim::StillRunning => return Err(GatewayError::IdempotencyKeyInUse),
            }
        }
        Ok(_) => None,
    };
    let stream = body.get::<bool>("stream").unwrap_or(false);
    let include_usage = body
        .get::<StreamOptions>("stream_options")
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    let trace = gw.tracing.request(&parts.headers, op, &model);
    let request = ClientRequest {
        op,
        body,
        trace,
        model: model.clone(),
        stream,
        include_usage,
        request_id: id.to_owned(),
        client: if client.is_empty() {
            "anonymous".to_owned()
        } else {
            client.clone()
        },
    };
    let Served {
        mut resp,
        upstream_time,
    } = serve(gw, table.clone(), route, request).await;
    if stream && resp.status().is_success() {
        // A stream's headers go out with its first token.
        route
            .metrics(&gw.metrics)
            .time_to_first_token(started.elapsed().as_secs_f64());
    }
    if let Some(upstream) = upstream_time {
        let added = started.elapsed().saturating_sub(upstream);
        route
            .metrics(&gw.metrics)
            .added_latency(added.as_secs_f64());
    }
    if let Some(lease) = lease
        && resp.status().is_success()
    {
        let (head, body) = resp.into_parts();
        let recording = Recording::new(
            body,
            lease,
            head.status,
            head.headers.clone(),
            MAX_REPLAY_BYTES,
            gw.budget.clone(),
        );
        resp = Response::from_parts(head, recording.boxed());
    }
    // Labelled by the route as configured, never by the string the client sent: a
    // pattern route would otherwise create a series per made-up model name.
    gw.metrics.route_request(
        route.metrics(&gw.metrics),
        resp.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    Ok(resp)
}

/// The part of `stream_options` the gateway acts on.
#[derive(serde::Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

/// The `Idempotency-Key` header, if the request has one; `Err` if it is unusable.
fn idempotency_key(headers: &hyper::HeaderMap) -> Result<Option<&str>, ()> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    match value.to_str() {
        Ok(key) if !key.is_empty() && key.len() <= MAX_KEY_LEN => Ok(Some(key)),
        _ => Err(()),
    }
}

/// A kept answer, sent again.
fn replay(stored: &Stored) -> Response<Body> {
    let mut resp = json_response(stored.status, stored.body.clone());
    let h = resp.headers_mut();
    for (k, v) in &stored.headers {
        h.insert(k.clone(), v.clone());
    }
    h.insert(
        "x-switchyard-idempotent-replay",
        hyper::header::HeaderValue::from_static("true"),
    );
    resp
}

fn models(gw: &Gateway, req: &Request<Incoming>) -> Response<Body> {
    let Some(table) = gw.table.load_full() else {
        return GatewayError::NotReady.response();
    };
    // Only the models the caller's key may use, when routes require keys; a caller no
    // route would serve is refused as on every other API path.
    let key = presented_key(req.headers());
    if table.admit(key).is_none() {
        return GatewayError::InvalidApiKey.response();
    }
    let data: Vec<Value> = table
        .routes()
        .iter()
        .filter(|r| !r.config.model.ends_with('*'))
        .filter(|r| match &r.client_keys {
            None => true,
            Some(keys) => key
                .and_then(|k| keys.identify(k))
                .is_some_and(|client| r.config.allows(client, &r.config.model)),
        })
        .map(|r| json!({"id": r.config.model, "object": "model", "created": 0, "owned_by": format!("switchyard/{}", r.config.policy)}))
        .collect();
    json_response(
        StatusCode::OK,
        Bytes::from(json!({"object": "list", "data": data}).to_string()),
    )
}

fn status(gw: &Gateway) -> Response<Body> {
    let table = gw.table.load_full();
    let now = Instant::now();
    let providers: Vec<Value> = table
        .iter()
        .flat_map(|t| t.providers())
        .map(|p| {
            let mut view = serde_json::to_value(p.view(now)).unwrap_or(Value::Null);
            if let (Some(reason), Some(obj)) = (p.unusable, view.as_object_mut()) {
                obj.insert("state".into(), json!(if reason == "Drained" { "drained" } else { "unusable" }));
                obj.insert("reason".into(), json!(reason));
            }
            json!({"name": p.config.name, "region": p.config.region, "local": p.config.local, "health": view})
        })
        .collect();
    let body = json!({
        "region": gw.region,
        "ready": table.is_some(),
        "pool": table.as_ref().map(|t| format!("{}/{}", t.config.namespace, t.config.pool)),
        "routes": table.iter().flat_map(|t| t.routes()).map(|r| r.config.model.clone()).collect::<Vec<_>>(),
        "providers": providers,
        "config": gw.config_state(),
        "idempotency": {"bytesHeld": gw.replays.bytes()},
    });
    json_response(StatusCode::OK, Bytes::from(body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::fresh_request_id;

    #[test]
    fn a_fresh_request_id_is_32_lowercase_hex_digits_and_new_each_time() {
        let (a, b) = (fresh_request_id(), fresh_request_id());
        assert_eq!(a.len(), 32);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_ne!(a, b);
    }
}
