//! The state every request shares: the current routing table, upstream clients and
//! metrics.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use hyper_util::client::legacy::ResponseFuture;

use crate::budget::MemoryBudget;
use crate::idempotency::Replays;
use crate::metrics::Metrics;
use crate::otel::Tracing;
use crate::table::RoutingTable;
use crate::upstream::{HttpClient, new_client};

static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Lookup-only maps keyed by the gateway's own configuration (never a client's string):
/// a fast hash, since these lookups run on every request.
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

thread_local! {
    /// This thread's upstream clients, by gateway and connect timeout.
    static CLIENTS: std::cell::RefCell<FastMap<(u64, Duration), HttpClient>> =
        std::cell::RefCell::new(FastMap::default());
}

/// Shared gateway state.
#[derive(Debug)]
pub struct Gateway {
    /// The table requests are routed with; `None` until the first configuration loads.
    pub table: ArcSwapOption<RoutingTable>,
    /// Region this replica serves.
    pub region: String,
    /// What each client connection may take.
    pub limits: ClientLimits,
    /// Whether `/metrics` and `/status` are served on the client port (no
    /// `--admin-listen`) rather than only on the admin listener.
    pub admin_on_api_port: bool,
    /// How long an idle upstream connection stays pooled.
    pub upstream_idle: Duration,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// Answers kept for requests retried with the same `Idempotency-Key`.
    pub replays: Arc<Replays>,
    /// Set when shutdown begins: readiness turns false and HTTP/1.1 answers close their
    /// connection.
    pub draining: AtomicBool,
    /// Everything buffered for requests (bodies, answers, recorded replays) shares this.
    pub budget: MemoryBudget,
    /// Turns true just before the drain deadline: streams still running end with an
    /// explicit interruption event instead of being cut.
    pub stopping: tokio::sync::watch::Sender<bool>,
    /// Trace spans (off unless the `OTEL_*` environment names a collector).
    pub tracing: Tracing,
    /// Tells this gateway's upstream clients apart from another's in the same thread.
    id: u64,
    tls: rustls::ClientConfig,
    config_state: Mutex<ConfigState>,
}

/// Bounds on every client, applied before anything costly is done for it.
#[derive(Debug, Clone, Copy)]
pub struct ClientLimits {
    /// Time for a request's headers to arrive; also how long an idle keep-alive
    /// connection stays open.
    pub header_timeout: Duration,
    /// Time for a request's whole body to arrive once its headers have.
    pub body_timeout: Duration,
    /// Largest request body, in bytes; a larger declared `Content-Length` is refused
    /// before any of it is read.
    pub max_body: usize,
    /// Open client connections; beyond them a connection gets a 503 and is closed.
    pub max_connections: usize,
    /// Bytes all requests together may buffer (see `budget`).
    pub memory_budget: usize,
}

/// What the last configuration attempt said, for `/status`.
#[derive(Debug, Default, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigState {
    /// Problems in the current configuration that did not prevent loading it.
    pub warnings: Vec<String>,
    /// The error of the last rejected update, cleared by the next good one.
    pub last_error: Option<String>,
}

impl Gateway {
    /// A gateway with no configuration yet.
    pub fn new(
        region: String,
        limits: ClientLimits,
        replay_bytes: usize,
        tls: rustls::ClientConfig,
    ) -> Self {
        Self {
            table: ArcSwapOption::empty(),
            region,
            limits,
            admin_on_api_port: true,
            upstream_idle: Duration::from_secs(90),
            metrics: Metrics::default(),
            replays: Arc::new(Replays::new(replay_bytes)),
            draining: AtomicBool::new(false),
            budget: MemoryBudget::new(limits.memory_budget),
            stopping: tokio::sync::watch::Sender::new(false),
            tracing: Tracing::default(),
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            tls,
            config_state: Mutex::new(ConfigState::default()),
        }
    }

    /// Swaps in a new table.
    pub fn install(&self, table: RoutingTable, mut warnings: Vec<String>) {
        warnings.extend(table.warnings.iter().cloned());
        self.table.store(Some(Arc::new(table)));
        self.metrics.config_reload(true);
        if let Ok(mut s) = self.config_state.lock() {
            *s = ConfigState {
                warnings,
                last_error: None,
            };
        }
    }

    /// Records a rejected update; the current table stays.
    pub fn config_failed(&self, error: &str) {
        self.metrics.config_reload(false);
        if let Ok(mut s) = self.config_state.lock() {
            s.last_error = Some(error.to_owned());
        }
    }

    /// The last configuration outcome.
    pub fn config_state(&self) -> ConfigState {
        self.config_state
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// Sends `req` on a pooled client whose connect timeout is `connect`: one pool per
    /// distinct timeout and per serving thread, so an upstream connection is only ever
    /// used by the thread (and runtime) that opened it. The returned future owns what it
    /// needs, so the client itself is not cloned per request.
    pub fn request(&self, connect: Duration, req: Request<Full<Bytes>>) -> ResponseFuture {
        CLIENTS.with(|clients| {
            clients
                .borrow_mut()
                .entry((self.id, connect))
                .or_insert_with(|| new_client(connect, self.upstream_idle, self.tls.clone()))
                .request(req)
        })
    }
}
