//! Operator metrics: reconciles, errors, durations, and API writes (so "idle means
//! idle" can be checked).

use std::sync::Mutex;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    namespace: String,
    name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    error: &'static str,
}

fn durations() -> Histogram {
    Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0])
}

/// The operator's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    reconciles: Family<KindLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    durations: Family<KindLabels, Histogram, fn() -> Histogram>,
    writes: Family<KindLabels, Counter>,
    pool_ready: Family<PoolLabels, prometheus_client::metrics::gauge::Gauge>,
    in_flight: Family<KindLabels, prometheus_client::metrics::gauge::Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Self {
            registry: Mutex::new(Registry::with_prefix("switchyard_operator")),
            reconciles: Family::default(),
            errors: Family::default(),
            durations: Family::new_with_constructor(durations),
            writes: Family::default(),
            pool_ready: Family::default(),
            in_flight: Family::default(),
        };
        if let Ok(mut r) = m.registry.lock() {
            r.register("reconciles", "Reconciles by kind", m.reconciles.clone());
            r.register(
                "reconcile_errors",
                "Failed reconciles by error",
                m.errors.clone(),
            );
            r.register(
                "reconcile_duration_seconds",
                "Reconcile duration by kind",
                m.durations.clone(),
            );
            r.register(
                "api_writes",
                "Writes to the API server by object kind",
                m.writes.clone(),
            );
            r.register(
                "pool_ready",
                "1 when the ProviderPool's Ready condition is True",
                m.pool_ready.clone(),
            );
            // kube-runtime does not expose its scheduler's queue; reconciles running is the
            // closest honest measure of backlog (bounded by the concurrency of 8).
            r.register(
                "reconciles_in_flight",
                "Reconciles running now, by kind",
                m.in_flight.clone(),
            );
        }
        m
    }
}

/// Observes a reconcile's duration when dropped.
#[derive(Debug)]
pub struct Timer<'a> {
    histogram: Histogram,
    in_flight: prometheus_client::metrics::gauge::Gauge,
    started: Instant,
    _metrics: &'a Metrics,
}

impl Drop for Timer<'_> {
    fn drop(&mut self) {
        self.histogram.observe(self.started.elapsed().as_secs_f64());
        self.in_flight.dec();
    }
}

impl Metrics {
    /// Counts a reconcile and times it.
    pub fn reconcile(&self, kind: &str) -> Timer<'_> {
        let labels = KindLabels {
            kind: kind.to_owned(),
        };
        self.reconciles.get_or_create(&labels).inc();
        let in_flight = self.in_flight.get_or_create(&labels).clone();
        in_flight.inc();
        Timer {
            in_flight,
            histogram: self.durations.get_or_create(&labels).clone(),
            started: Instant::now(),
            _metrics: self,
        }
    }

    /// Counts a failed reconcile.
    pub fn error(&self, label: &'static str) {
        self.errors
            .get_or_create(&ErrorLabels { error: label })
            .inc();
    }

    /// Counts a write to the API server.
    pub fn write(&self, kind: &str) {
        self.writes
            .get_or_create(&KindLabels {
                kind: kind.to_owned(),
            })
            .inc();
    }

    /// Records whether a pool is Ready.
    pub fn pool_ready(&self, namespace: &str, name: &str, ready: bool) {
        let labels = PoolLabels {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        self.pool_ready.get_or_create(&labels).set(i64::from(ready));
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Ok(r) = self.registry.lock() {
            let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        }
        out
    }
}
