//! Every error the gateway itself answers with, shaped like OpenAI's (`{"error":
//! {"message", "type", "code", "param"}}`) so SDKs surface them well. The `code` of each
//! is stable: clients and tests match on it.

use bytes::Bytes;
use hyper::header::{HeaderValue, RETRY_AFTER};
use hyper::{Response, StatusCode};
use serde_json::json;

use crate::response::{Body, json_response};

/// An error the gateway answers a client with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    /// No or a wrong client key.
    #[error("missing or invalid API key; send it as 'Authorization: Bearer <key>'")]
    InvalidApiKey,
    /// No configuration has loaded yet.
    #[error("no configuration loaded yet")]
    NotReady,
    /// The replica is draining.
    #[error("this replica is shutting down")]
    ShuttingDown,
    /// An unknown path.
    #[error("{0}")]
    UnknownUrl(String),
    /// A known path with the wrong method.
    #[error("{method} is not allowed on {path}")]
    MethodNotAllowed {
        /// The method used.
        method: String,
        /// The path.
        path: String,
    },
    /// The pool has no routes at all.
    #[error("no RoutingPolicy serves this gateway's ProviderPool yet, so it routes no model")]
    NoRoutes,
    /// The requested model is not routed.
    #[error(
        "the model {0:?} is not routed by this gateway; GET /v1/models lists the models it serves"
    )]
    ModelNotFound(String),
    /// The body has no `model`.
    #[error("the request body needs a \"model\" string")]
    MissingModel,
    /// The body is not JSON.
    #[error("{0}")]
    InvalidJson(String),
    /// The body is over the limit.
    #[error("the request body exceeds {0} bytes")]
    BodyTooLarge(usize),
    /// The body did not arrive in time.
    #[error("the request body did not arrive within {0} s")]
    BodyTimeout(u64),
    /// The body could not be read.
    #[error("the request body could not be read")]
    BodyUnreadable,
    /// The memory budget has no room for what the request needs buffered.
    #[error("{0}; retry shortly")]
    MemoryBudget(String),
    /// The client's key may not use the model.
    #[error(
        "the API key of client {client:?} may not use model {model:?}; GET /v1/models lists the models it may use"
    )]
    ModelNotAllowed {
        /// The client's name.
        client: String,
        /// The model asked for.
        model: String,
    },
    /// The route cannot work as configured.
    #[error("{0}")]
    Misconfigured(String),
    /// An unusable `Idempotency-Key`.
    #[error("Idempotency-Key must be 1 to {0} visible ASCII characters")]
    InvalidIdempotencyKey(usize),
    /// An `Idempotency-Key` reused for a different request.
    #[error(
        "this Idempotency-Key was already used for a different request; use a new key for a new request"
    )]
    IdempotencyKeyReused,
    /// The first request with the key is still running.
    #[error("the first request with this Idempotency-Key is still running; retry later")]
    IdempotencyKeyInUse,
    /// No provider answered in time and retrying on timeouts is off.
    #[error("{0}")]
    UpstreamTimeout(String),
    /// No connection to the provider and retrying on connect errors is off.
    #[error("{0}")]
    UpstreamConnect(String),
    /// Every try failed.
    #[error("no provider could serve model {model:?} after {tries} tries: {why}")]
    NoProvider {
        /// The model asked for.
        model: String,
        /// Tries made.
        tries: u32,
        /// What went wrong.
        why: String,
    },
    /// The route's degraded answer, when it is an error.
    #[error("{message}")]
    Degraded {
        /// The status configured.
        status: StatusCode,
        /// The text configured.
        message: String,
    },
}

impl GatewayError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidApiKey => StatusCode::UNAUTHORIZED,
            Self::UnknownUrl(_) | Self::NoRoutes | Self::ModelNotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::MissingModel
            | Self::InvalidJson(_)
            | Self::BodyUnreadable
            | Self::InvalidIdempotencyKey(_) => StatusCode::BAD_REQUEST,
            Self::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::ModelNotAllowed { .. } => StatusCode::FORBIDDEN,
            Self::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Self::IdempotencyKeyInUse => StatusCode::CONFLICT,
            Self::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::UpstreamConnect(_) => StatusCode::BAD_GATEWAY,
            Self::Degraded { status, .. } => *status,
            Self::NotReady
            | Self::ShuttingDown
            | Self::MemoryBudget(_)
            | Self::Misconfigured(_)
            | Self::NoProvider { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// OpenAI's error `type`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::ModelNotAllowed { .. } => "permission_error",
            Self::NotReady
            | Self::ShuttingDown
            | Self::MemoryBudget(_)
            | Self::Misconfigured(_)
            | Self::UpstreamTimeout(_)
            | Self::UpstreamConnect(_)
            | Self::NoProvider { .. }
            | Self::Degraded { .. } => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// The stable `code`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidApiKey => "invalid_api_key",
            Self::NotReady => "not_ready",
            Self::ShuttingDown => "shutting_down",
            Self::UnknownUrl(_) => "unknown_url",
            Self::MethodNotAllowed { .. } => "method_not_allowed",
            Self::NoRoutes | Self::ModelNotFound(_) => "model_not_found",
            Self::MissingModel => "missing_model",
            Self::InvalidJson(_) => "invalid_json",
            Self::BodyTooLarge(_) => "request_too_large",
            Self::BodyTimeout(_) => "body_timeout",
            Self::BodyUnreadable => "body_unreadable",
            Self::MemoryBudget(_) => "memory_budget_exhausted",
            Self::ModelNotAllowed { .. } => "model_not_allowed",
            Self::Misconfigured(_) => "misconfigured",
            Self::InvalidIdempotencyKey(_) => "invalid_idempotency_key",
            Self::IdempotencyKeyReused => "idempotency_key_reused",
            Self::IdempotencyKeyInUse => "idempotency_key_in_use",
            Self::UpstreamTimeout(_) => "upstream_timeout",
            Self::UpstreamConnect(_) => "upstream_connect_error",
            Self::NoProvider { .. } => "no_provider_available",
            Self::Degraded { .. } => "degraded",
        }
    }

    /// The response: an OpenAI error body, and `Retry-After` where waiting helps.
    pub fn response(&self) -> Response<Body> {
        let body = json!({"error": {"message": self.to_string(), "type": self.kind(), "code": self.code(), "param": null}});
        let mut resp = json_response(self.status(), Bytes::from(body.to_string()));
        if matches!(self, Self::MemoryBudget(_)) {
            resp.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

impl From<GatewayError> for Response<Body> {
    fn from(e: GatewayError) -> Self {
        e.response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_carry_openai_shape_stable_codes_and_retry_after_where_waiting_helps() {
        let e = GatewayError::ModelNotAllowed {
            client: "intern".into(),
            model: "gpt-4o".into(),
        };
        assert_eq!(e.status(), StatusCode::FORBIDDEN);
        assert_eq!(
            (e.kind(), e.code()),
            ("permission_error", "model_not_allowed")
        );
        let busy = GatewayError::MemoryBudget("no room".into()).response();
        assert_eq!(busy.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(busy.headers()[RETRY_AFTER], "1");
        assert!(
            GatewayError::InvalidApiKey
                .response()
                .headers()
                .get(RETRY_AFTER)
                .is_none()
        );
    }
}
