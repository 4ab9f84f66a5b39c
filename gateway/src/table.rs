//! The routing table: one immutable snapshot of configuration plus the live state it
//! points at. A reload builds a new table and swaps it in atomically; health, breakers
//! and retry budgets are carried forward by provider name and route model, so a config
//! change never resets what the gateway has learned and never drops a request in flight.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, OnceLock};

use crds::{GatewayConfig, ProviderConfig, RouteConfig, TargetConfig};
use hyper::header::HeaderValue;
use tokio::time::Instant;

use crate::auth::ClientKeys;
use crate::dialect::{self, Dialect, Upstream};
use crate::gateway::FastMap;
use crate::health::{Availability, Health, HealthView, ProviderHealth};
use crate::metrics::{Metrics, ProviderMetrics, RouteMetrics};
use crate::retry::RetryBudget;

/// Secret values by Secret name and key. Never printed.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secrets(BTreeMap<String, BTreeMap<String, String>>);

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(
                self.0
                    .iter()
                    .map(|(name, keys)| (name, keys.keys().collect::<Vec<_>>())),
            )
            .finish()
    }
}

impl Secrets {
    /// Adds one Secret's entries.
    pub fn insert(&mut self, name: String, data: BTreeMap<String, String>) {
        self.0.insert(name, data);
    }

    /// Forgets a deleted Secret.
    pub fn remove(&mut self, name: &str) {
        self.0.remove(name);
    }

    /// One value.
    pub fn get(&self, name: &str, key: &str) -> Option<&str> {
        self.0.get(name)?.get(key).map(String::as_str)
    }

    /// Every entry of one Secret.
    pub fn all(&self, name: &str) -> Option<&BTreeMap<String, String>> {
        self.0.get(name)
    }
}

/// A provider API key; its `Debug` never shows the value.
#[derive(Clone)]
pub struct ApiKey(pub String);

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// A provider in the table.
#[derive(Debug)]
pub struct ProviderEntry {
    /// Compiled settings.
    pub config: ProviderConfig,
    /// Live health of its endpoint, shared across reloads.
    pub health: Arc<ProviderHealth>,
    /// The models routes use it for, each with its own health.
    pub models: Vec<ModelSlot>,
    /// The key, when the provider needs one and its Secret was found.
    pub api_key: Option<ApiKey>,
    /// Why the provider cannot be used at all, whatever its health.
    pub unusable: Option<&'static str>,
    /// Its metric handles, resolved on first use.
    pub metrics: OnceLock<ProviderMetrics>,
    /// Its name and region as response header values (`None` if not valid as one).
    pub headers: Option<(HeaderValue, HeaderValue)>,
    /// The `Host` its requests carry, built once (the HTTP client would format it on
    /// every request).
    host: Option<HeaderValue>,
}

/// One of a provider's models as the routes use it.
#[derive(Debug)]
pub struct ModelSlot {
    /// The model as configured: its Azure deployment, upstream name, or (for a pattern
    /// route) the pattern. Never a name a client chose.
    pub key: String,
    /// Its HTTP-level health, shared by every route naming it and across reloads.
    pub health: Arc<Health>,
    /// A target naming it, to build a recovery check from; `None` for a pattern, whose
    /// requests each name their own model.
    pub check: Option<TargetConfig>,
}

impl ProviderEntry {
    /// The provider as a whole, its models included.
    pub fn view(&self, now: Instant) -> HealthView {
        self.health.view(
            now,
            self.models
                .iter()
                .map(|m| (m.key.as_str(), m.health.as_ref())),
        )
    }

    /// Its metric handles in `metrics`.
    pub fn metrics(&self, metrics: &Metrics) -> &ProviderMetrics {
        self.metrics
            .get_or_init(|| metrics.for_provider(&self.config.name))
    }

    /// The API it speaks.
    pub fn dialect(&self) -> &'static dyn Dialect {
        dialect::of(self.config.provider_type)
    }

    /// What its dialect needs to address and authenticate a request.
    pub fn upstream(&self) -> Upstream<'_> {
        Upstream {
            provider: &self.config,
            key: self.api_key.as_ref(),
            host: self.host.as_ref(),
        }
    }
}

/// The `Host` header for requests to `endpoint`: its authority, unless that carries
/// credentials (then the HTTP client derives it from the URL as usual).
fn host_header(endpoint: &str) -> Option<HeaderValue> {
    let uri: hyper::Uri = endpoint.parse().ok()?;
    let authority = uri.authority()?.as_str();
    if authority.contains('@') {
        return None;
    }
    HeaderValue::from_str(authority).ok()
}

/// What a target's health is kept under within its provider: the model as the
/// configuration names it (a pattern route's targets share the pattern's).
fn model_key<'a>(route: &'a RouteConfig, t: &'a TargetConfig) -> &'a str {
    t.deployment
        .as_deref()
        .or(t.upstream_model.as_deref())
        .unwrap_or(&route.model)
}

/// A route in the table.
#[derive(Debug)]
pub struct RouteEntry {
    /// Compiled settings.
    pub config: RouteConfig,
    /// Round-robin position.
    pub next: AtomicUsize,
    /// Retry budget, shared across reloads.
    pub budget: Arc<RetryBudget>,
    /// Each target's health, in the order of `config.targets`.
    health: Vec<Arc<Health>>,
    /// Client keys accepted on this route; `None` when the route is open.
    pub client_keys: Option<Arc<ClientKeys>>,
    /// Why the route refuses every request (its client-key Secret is missing).
    pub misconfigured: Option<String>,
    /// Its metric handles, resolved on first use.
    pub metrics: OnceLock<RouteMetrics>,
}

impl RouteEntry {
    /// The health of `target`, one of this route's.
    pub fn health_of(&self, target: &TargetConfig) -> Option<&Arc<Health>> {
        let i = self
            .config
            .targets
            .iter()
            .position(|t| std::ptr::eq(t, target))?;
        self.health.get(i)
    }

    /// Its metric handles in `metrics`.
    pub fn metrics(&self, metrics: &Metrics) -> &RouteMetrics {
        self.metrics
            .get_or_init(|| metrics.for_route(&self.config.model))
    }
}

/// What a request's key said before its body was read.
#[derive(Debug, Clone, Copy)]
pub enum Admission<'a> {
    /// The key belongs to `client` of `keys`.
    Client {
        keys: &'a Arc<ClientKeys>,
        client: &'a str,
    },
    /// No key set knows the key, but some route needs none (or cannot check one): the
    /// route decides.
    Undecided,
}

/// The immutable snapshot requests are served from.
#[derive(Debug)]
pub struct RoutingTable {
    /// The configuration it was built from.
    pub config: GatewayConfig,
    providers: FastMap<String, ProviderEntry>,
    routes: Vec<RouteEntry>,
    /// Whether some route takes requests without a client key (or cannot check one).
    any_open: bool,
    /// The distinct client-key sets of all routes, one per Secret.
    key_sets: Vec<Arc<ClientKeys>>,
    /// Problems that did not stop the table from being built.
    pub warnings: Vec<String>,
    /// The gateway's region as a response header value, built once.
    pub region_header: Option<HeaderValue>,
}

impl RoutingTable {
    /// Builds a table, carrying live state forward from `previous`.
    pub fn build(
        config: GatewayConfig,
        secrets: &Secrets,
        previous: Option<&RoutingTable>,
        now: Instant,
    ) -> Self {
        let mut providers = FastMap::default();
        for p in &config.providers {
            let health = previous
                .and_then(|t| t.providers.get(&p.name))
                .map_or_else(|| Arc::new(ProviderHealth::new(now)), |e| e.health.clone());
            let api_key = p
                .credentials
                .as_ref()
                .and_then(|c| secrets.get(&c.name, &c.key))
                .map(|k| ApiKey(k.to_owned()));
            let unusable = if !p.enabled {
                Some("Drained")
            } else if p.credentials.is_some() && api_key.is_none() {
                Some("MissingCredentials")
            } else {
                None
            };
            if let Some(reason) = unusable.filter(|r| *r != "Drained") {
                tracing::warn!(provider = %p.name, reason, "provider cannot be used");
            }
            providers.insert(
                p.name.clone(),
                ProviderEntry {
                    config: p.clone(),
                    health,
                    models: Vec::new(),
                    api_key,
                    unusable,
                    metrics: OnceLock::new(),
                    headers: HeaderValue::from_str(&p.name)
                        .ok()
                        .zip(HeaderValue::from_str(&p.region).ok()),
                    host: host_header(&p.endpoint),
                },
            );
        }
        // A provider's model keeps its health across reloads, whichever routes name it.
        let mut slots: HashMap<(String, String), usize> = HashMap::new();
        let mut slot_of = |providers: &mut FastMap<String, ProviderEntry>,
                           route: &RouteConfig,
                           t: &TargetConfig|
         -> Arc<Health> {
            let key = model_key(route, t);
            let Some(entry) = providers.get_mut(&t.provider) else {
                return Arc::new(Health::new(now));
            };
            if let Some(&i) = slots.get(&(t.provider.clone(), key.to_owned())) {
                return entry.models[i].health.clone();
            }
            let health = previous
                .and_then(|old| old.providers.get(&t.provider))
                .and_then(|old| old.models.iter().find(|m| m.key == key))
                .map_or_else(|| Arc::new(Health::new(now)), |m| m.health.clone());
            slots.insert((t.provider.clone(), key.to_owned()), entry.models.len());
            entry.models.push(ModelSlot {
                key: key.to_owned(),
                health: health.clone(),
                check: t.upstream_model.is_some().then(|| t.clone()),
            });
            health
        };
        let target_health: Vec<Vec<Arc<Health>>> = config
            .routes
            .iter()
            .map(|r| {
                r.targets
                    .iter()
                    .map(|t| slot_of(&mut providers, r, t))
                    .collect()
            })
            .collect();
        let mut warnings = Vec::new();
        // Routes naming the same Secret share one key set.
        let mut key_sets: HashMap<String, Arc<ClientKeys>> = HashMap::new();
        let routes: Vec<RouteEntry> = config
            .routes
            .iter()
            .zip(target_health)
            .map(|(r, health)| {
                let budget = previous
                    .and_then(|t| t.routes.iter().find(|old| old.config.model == r.model))
                    .map_or_else(|| Arc::new(RetryBudget::new(now)), |old| old.budget.clone());
                let (client_keys, misconfigured) = match &r.client_auth_secret {
                    None => (None, None),
                    Some(name) => match secrets.all(name) {
                        Some(keys) if !keys.is_empty() => {
                            // A misspelt client in an allow-list would limit nobody.
                            for client in r.client_models.keys().filter(|c| !keys.contains_key(*c)) {
                                warnings.push(format!(
                                    "route {:?}: clientAuth.clients names {client:?}, which is not a key of the Secret {name:?}, so it limits nobody",
                                    r.model
                                ));
                            }
                            let set = key_sets
                                .entry(name.clone())
                                .or_insert_with(|| Arc::new(ClientKeys::new(keys)));
                            (Some(set.clone()), None)
                        }
                        _ => (
                            None,
                            Some(format!(
                                "the client key Secret {name:?} is missing or empty"
                            )),
                        ),
                    },
                };
                RouteEntry {
                    config: r.clone(),
                    next: AtomicUsize::new(0),
                    budget,
                    health,
                    client_keys,
                    misconfigured,
                    metrics: OnceLock::new(),
                }
            })
            .collect();
        for w in &warnings {
            tracing::warn!(warning = %w, "configuration problem");
        }
        // A route without keys is open, or misconfigured (its Secret is missing) and must
        // say so with a 503 once the model is known: either way no early 401.
        let any_open = routes.iter().any(|r: &RouteEntry| r.client_keys.is_none());
        Self {
            region_header: HeaderValue::from_str(&config.region).ok(),
            config,
            providers,
            routes,
            any_open,
            key_sets: key_sets.into_values().collect(),
            warnings,
        }
    }

    /// Who a request presenting `key` (from its headers) is, checked before its body is
    /// read so that a client without a valid key costs nothing: `None` when no route would
    /// serve it. The route's own check, once the model is known, still decides, reusing
    /// the identification when the route has the same key set.
    pub fn admit(&self, key: Option<&str>) -> Option<Admission<'_>> {
        let identified = key.and_then(|k| {
            self.key_sets.iter().find_map(|keys| {
                keys.identify(k)
                    .map(|client| Admission::Client { keys, client })
            })
        });
        match identified {
            Some(admission) => Some(admission),
            None if self.any_open => Some(Admission::Undecided),
            None => None,
        }
    }

    /// The route for a requested model: exact, else the longest matching pattern.
    pub fn route_for(&self, model: &str) -> Option<&RouteEntry> {
        let config = self.config.route_for(model)?;
        self.routes.iter().find(|r| r.config.model == config.model)
    }

    /// Whether `target` of `route` may take a request now: its provider's endpoint and
    /// the model must both allow it. `None` when the provider is not in the table.
    pub fn availability(
        &self,
        route: &RouteEntry,
        target: &TargetConfig,
        now: Instant,
    ) -> Option<Availability> {
        let breaker = &route.config.circuit_breaker;
        let provider = self.providers.get(&target.provider)?;
        let link = provider.health.link.availability(now, breaker);
        Some(match route.health_of(target) {
            Some(own) => link.and(own.availability(now, breaker)),
            None => link,
        })
    }

    /// Records one finished try of `provider`'s target on `route` in that target's
    /// health, as a try would.
    #[cfg(test)]
    pub fn record(
        &self,
        route: &RouteEntry,
        provider: &str,
        now: Instant,
        outcome: crate::health::Outcome,
        latency: Option<std::time::Duration>,
    ) {
        let p = self.provider(provider).expect("provider");
        let target = route
            .config
            .targets
            .iter()
            .find(|t| t.provider == provider)
            .expect("target");
        let h = route.health_of(target).expect("health");
        h.begin();
        h.settle(
            now,
            outcome,
            latency,
            &route.config.circuit_breaker,
            &p.config.health.passive,
        );
    }

    /// A provider by name.
    pub fn provider(&self, name: &str) -> Option<&ProviderEntry> {
        self.providers.get(name)
    }

    /// Every provider, in config order.
    pub fn providers(&self) -> impl Iterator<Item = &ProviderEntry> {
        self.config
            .providers
            .iter()
            .filter_map(|p| self.providers.get(&p.name))
    }

    /// Every route, in config order.
    pub fn routes(&self) -> &[RouteEntry] {
        &self.routes
    }
}
