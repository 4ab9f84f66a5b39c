//! Operator metrics: reconciles, errors, durations, API writes and every API request by
//! verb and resource (so "idle means idle" and "requests per pool" can be checked).

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
struct RequestLabels {
    verb: &'static str,
    resource: String,
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
    requests: Family<RequestLabels, Counter>,
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
            requests: Family::default(),
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
                "api_requests",
                "Requests sent to the API server, by verb (get, list, watch, create, patch, update, delete) and resource",
                m.requests.clone(),
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

    /// Counts a request about to be sent to the API server.
    pub fn request(&self, method: &str, path: &str, query: Option<&str>) {
        let (verb, resource) = classify(method, path, query);
        self.requests
            .get_or_create(&RequestLabels { verb, resource })
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

/// The Kubernetes verb and resource (`pods`, `providerpools/status`) of a request, read
/// from its method and path: `/api/v1/...` or `/apis/GROUP/VERSION/...`, then
/// optionally `namespaces/NS/`, then `RESOURCE[/NAME[/SUBRESOURCE]]`.
fn classify(method: &str, path: &str, query: Option<&str>) -> (&'static str, String) {
    let rest = path.strip_prefix("/api/v1/").or_else(|| {
        let groups = path.strip_prefix("/apis/")?;
        groups.splitn(3, '/').nth(2)
    });
    let mut parts: Vec<&str> = rest.unwrap_or_default().split('/').collect();
    if parts.len() > 2 && parts[0] == "namespaces" {
        parts.drain(..2);
    }
    let named = parts.len() > 1;
    let resource = match parts.as_slice() {
        [resource, _, sub, ..] => format!("{resource}/{sub}"),
        [resource, ..] if !resource.is_empty() => (*resource).to_owned(),
        _ => "other".to_owned(),
    };
    let watch = query.is_some_and(|q| q.split('&').any(|p| p == "watch=true" || p == "watch=1"));
    let verb = match method {
        "GET" if watch => "watch",
        "GET" if named => "get",
        "GET" => "list",
        "POST" => "create",
        "PATCH" => "patch",
        "PUT" => "update",
        "DELETE" if named => "delete",
        "DELETE" => "deletecollection",
        _ => "other",
    };
    (verb, resource)
}

#[cfg(test)]
mod tests {
    use super::classify;

    #[test]
    fn requests_are_classified_by_verb_and_resource() {
        let cases = [
            (
                "GET",
                "/api/v1/namespaces/t/configmaps/c",
                None,
                "get",
                "configmaps",
            ),
            (
                "GET",
                "/api/v1/namespaces/t/configmaps",
                Some("labelSelector=a"),
                "list",
                "configmaps",
            ),
            (
                "GET",
                "/apis/apps/v1/deployments",
                Some("watch=true&resourceVersion=1"),
                "watch",
                "deployments",
            ),
            (
                "PATCH",
                "/apis/switchyard.dev/v1alpha1/namespaces/t/providerpools/p/status",
                None,
                "patch",
                "providerpools/status",
            ),
            (
                "POST",
                "/apis/events.k8s.io/v1/namespaces/t/events",
                None,
                "create",
                "events",
            ),
            (
                "DELETE",
                "/api/v1/namespaces/t/services/s",
                None,
                "delete",
                "services",
            ),
            (
                "GET",
                "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/x",
                None,
                "get",
                "customresourcedefinitions",
            ),
        ];
        for (method, path, query, verb, resource) in cases {
            assert_eq!(
                classify(method, path, query),
                (verb, resource.to_owned()),
                "{method} {path}"
            );
        }
    }
}
