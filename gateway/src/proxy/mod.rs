//! Serving one client request: choose a target, try it, and on a transient failure try
//! another — on the same request — until one answers, the policy's limits are reached,
//! or nothing can serve.
//!
//! - `plan`: the failover decision, pure (which target next, after what wait);
//! - `attempt`: one try, from sending the request to its answer or classified failure;
//! - `stream`: forwarding a stream, and resuming it elsewhere when its provider breaks;
//! - `synthetic`: answers the gateway makes up (content-policy text, degraded mode).

mod attempt;
mod plan;
mod stream;
mod synthetic;

use std::sync::Arc;
use std::time::Duration;

use hyper::header::HeaderValue;
use hyper::{Response, StatusCode};
use rand::Rng;
use tokio::time::Instant;

use crate::body::RequestBody;
use crate::dialect::Operation;
use crate::error::GatewayError;
use crate::gateway::Gateway;
use crate::otel::RequestSpan;
use crate::response::{Body, names};
use crate::table::{RouteEntry, RoutingTable};
use attempt::{Tried, attempt};
use plan::{Next, OnRefusal, Plan};
use synthetic::synthetic_answer;

/// The response for the client, and how long the serving provider took (to its first
/// token for a stream, its whole body otherwise): the rest of the request's time is what
/// the gateway added. No provider time when the gateway answered by itself.
#[derive(Debug)]
pub struct Served {
    /// The response.
    pub resp: Response<Body>,
    /// The provider's share of the time.
    pub upstream_time: Option<Duration>,
}

/// A validated client request.
#[derive(Debug)]
pub struct ClientRequest {
    /// Which operation.
    pub op: Operation,
    /// The JSON body, replayed on every try.
    pub body: RequestBody,
    /// The public model asked for.
    pub model: String,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// Whether the client asked for usage in the stream.
    pub include_usage: bool,
    /// Request id, propagated upstream and returned.
    pub request_id: String,
    /// Who asks: the client's name in the route's client-key Secret, or `anonymous`.
    pub client: String,
    /// Its trace span (nothing when tracing is off).
    pub trace: RequestSpan,
}

/// Serves `req` with the current table.
pub async fn serve(
    gw: &Arc<Gateway>,
    table: Arc<RoutingTable>,
    first: &RouteEntry,
    req: ClientRequest,
) -> Served {
    let started = Instant::now();
    let deadline = started + first.config.timeouts.total.get();
    first.budget.record_request(started);
    let mut plan = Plan::new(&table, first, deadline);
    let mut first_provider: Option<String> = None;

    let why = loop {
        let unit: f64 = rand::rng().random();
        let (route, target, wait, least_bad) = match plan.next(Instant::now(), unit) {
            Next::Try {
                route,
                target,
                wait,
                least_bad,
            } => (route, target, wait, least_bad),
            Next::GiveUp(why) => break why,
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        if least_bad {
            tracing::info!(request_id = %req.request_id, provider = %target.provider, "no usable provider; trying the one that recovers soonest");
        }
        first_provider.get_or_insert_with(|| target.provider.clone());
        let served_by = target.provider.as_str();
        let tries = plan.tries();
        let done = |mut resp: Response<Body>| {
            decorate(&mut resp, &table, served_by, tries, &req.trace);
            Served {
                resp,
                upstream_time: None,
            }
        };
        match attempt(gw, &table, route, target, &req, deadline, plan.tried()).await {
            Tried::Answer(resp, upstream_time) => {
                let other_model = route.config.model != first.config.model;
                if other_model || first_provider.as_deref() != Some(served_by) {
                    first.metrics(&gw.metrics).failover(other_model);
                }
                if !plan.failures().is_empty() {
                    first.metrics(&gw.metrics).rescue(true);
                }
                return Served {
                    upstream_time: Some(upstream_time),
                    ..done(resp)
                };
            }
            Tried::Retry(retry) => {
                tracing::debug!(request_id = %req.request_id, provider = %served_by, kind = retry.kind, why = %retry.why, "try failed");
                plan.failed(retry.kind, retry.why, retry.again);
            }
            Tried::Final(resp) => return done(resp),
            Tried::ContextLength(resp) => {
                if !plan.context_length_exceeded() {
                    return done(resp);
                }
            }
            Tried::ContentPolicy(resp) => match plan.refused() {
                OnRefusal::Answer(text) => {
                    return done(synthetic_answer(&req, text, StatusCode::OK));
                }
                OnRefusal::Redirected => {}
                OnRefusal::PassThrough => return done(resp),
            },
        }
    };

    let mut resp = match &first.config.degraded_response {
        Some(degraded) => {
            let status = StatusCode::from_u16(u16::try_from(degraded.status).unwrap_or(503))
                .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            if status.is_success() {
                synthetic_answer(&req, &degraded.message, status)
            } else {
                GatewayError::Degraded {
                    status,
                    message: degraded.message.clone(),
                }
                .response()
            }
        }
        None => GatewayError::NoProvider {
            model: req.model.clone(),
            tries: plan.tries(),
            why,
        }
        .response(),
    };
    decorate(&mut resp, &table, "", plan.tries(), &req.trace);
    if !plan.failures().is_empty() {
        first.metrics(&gw.metrics).rescue(false);
    }
    if let Some(value) = failures_header(plan.failures()) {
        resp.headers_mut().insert(&names::X_FAILURES, value);
    }
    Served {
        resp,
        upstream_time: None,
    }
}

/// The failed tries as `provider:class` in order (`a:server_error, b:rate_limited`):
/// provider names come from the configuration, classes from the gateway, so the value is
/// always a valid header and never carries a provider's own words.
fn failures_header(failures: &[plan::Failure]) -> Option<HeaderValue> {
    if failures.is_empty() {
        return None;
    }
    let text = failures
        .iter()
        .map(|f| format!("{}:{}", f.provider, f.kind))
        .collect::<Vec<_>>()
        .join(", ");
    HeaderValue::from_str(&text).ok()
}

/// Response headers naming who served; the same facts on the request's span.
fn decorate(
    resp: &mut Response<Body>,
    table: &RoutingTable,
    provider: &str,
    tries: u32,
    trace: &RequestSpan,
) {
    trace.finished(provider, resp.status().as_u16(), tries);
    // The request id is set by the server on every response, this one included.
    let h = resp.headers_mut();
    h.insert(&names::X_ATTEMPTS, HeaderValue::from(tries));
    if let Some((name, region)) = table.provider(provider).and_then(|p| p.headers.clone()) {
        h.insert(&names::X_PROVIDER, name);
        h.insert(&names::X_PROVIDER_REGION, region);
    }
    if let Some(region) = &table.region_header {
        h.insert(&names::X_REGION, region.clone());
    }
}
