//! `compile(pool, policies, region)`: the pure function that turns what users wrote into
//! the [`GatewayConfig`] of one region.
//!
//! A problem with the pool itself (an unknown region) fails the whole compilation. A
//! problem with one policy rejects only that policy, with errors that name the field, so
//! one team's typo never takes down another team's routes. Two policies claiming the same
//! model: the older one (by creation time, then name) keeps it and the conflict is
//! reported for the newer one.

use std::collections::{BTreeMap, BTreeSet};

use kube::ResourceExt;

use crate::gateway_config::{
    GATEWAY_CONFIG_VERSION, GatewayConfig, ProviderConfig, RouteConfig, TargetConfig,
};
use crate::policy::{RegionalMode, Route, RoutingPolicy};
use crate::pool::{Continuation, Provider, ProviderPool, ProviderType};

/// A problem that makes a region's configuration impossible to build.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    /// The region asked for is not one of the pool's regions.
    #[error(
        "region {region:?} is not in spec.regions of ProviderPool {pool:?} (regions: {available})"
    )]
    UnknownRegion {
        /// ProviderPool name.
        pool: String,
        /// The region asked for.
        region: String,
        /// The pool's regions, comma-separated.
        available: String,
    },
}

/// One problem in a policy, located by the field path a user would edit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct PolicyError {
    /// What kind of problem, for status reasons.
    pub kind: PolicyErrorKind,
    /// Path of the offending field, such as `spec.routes[0].targets[1].provider`.
    pub field: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// The kinds of policy problems, which status conditions tell apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyErrorKind {
    /// A target names a provider the pool does not have.
    UnknownProvider,
    /// A fallback or redirect names a model no route serves.
    UnknownModel,
    /// A target cannot serve the route (a model its provider lacks, no local target).
    Unservable,
    /// The pool's limits: its route count, or what a ConfigMap holds.
    OverLimit,
}

/// Why a policy contributes no routes to a region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRejection {
    /// RoutingPolicy name.
    pub policy: String,
    /// Every problem found.
    pub errors: Vec<PolicyError>,
}

/// A route claimed by two policies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConflict {
    /// The model both policies route.
    pub model: String,
    /// The older policy, which serves the model.
    pub winner: String,
    /// The newer policy, whose route is ignored.
    pub loser: String,
}

/// The outcome of compiling one region.
#[derive(Debug, Clone, PartialEq)]
pub struct Compiled {
    /// The configuration, built from every policy that was not rejected.
    pub config: GatewayConfig,
    /// The pool's policies, oldest first: the order that decides who keeps a contested
    /// model, and who is dropped first when the configuration is too large.
    pub order: Vec<String>,
    /// Policies left out, with their errors.
    pub rejected: Vec<PolicyRejection>,
    /// Routes left out because an older policy claims the same model.
    pub conflicts: Vec<RouteConflict>,
}

/// Routes one pool may have across all its policies: with the schemas' own bounds, this
/// keeps the largest configuration inside one ConfigMap (see the size test).
pub const MAX_POOL_ROUTES: usize = 256;

/// Compiles the pool and the policies that reference it into `region`'s GatewayConfig.
///
/// Policies from another namespace or referencing another pool are ignored.
pub fn compile(
    pool: &ProviderPool,
    policies: &[RoutingPolicy],
    region: &str,
) -> Result<Compiled, CompileError> {
    let pool_name = pool.name_any();
    let namespace = pool.namespace().unwrap_or_default();
    if !pool.spec.regions.iter().any(|r| r.name == region) {
        return Err(CompileError::UnknownRegion {
            pool: pool_name,
            region: region.to_owned(),
            available: pool
                .spec
                .regions
                .iter()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        });
    }

    let mut providers: Vec<ProviderConfig> = pool
        .spec
        .providers
        .iter()
        .map(|p| provider_config(p, region))
        .collect();
    providers.sort_by(provider_order);

    // Oldest first: the order decides who wins a contested model.
    let mut ours: Vec<&RoutingPolicy> = policies
        .iter()
        .filter(|p| {
            p.spec.pool_ref.name == pool_name && p.namespace().unwrap_or_default() == namespace
        })
        .collect();
    ours.sort_by(|a, b| {
        a.metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0)
            .cmp(&b.metadata.creation_timestamp.as_ref().map(|t| t.0))
            .then_with(|| a.name_any().cmp(&b.name_any()))
    });

    let order: Vec<String> = ours.iter().map(|p| p.name_any()).collect();
    let mut rejected = Vec::new();
    let mut accepted: Vec<(&RoutingPolicy, Vec<RouteConfig>)> = Vec::new();
    let mut route_count = 0;
    for policy in ours {
        match compile_policy(pool, policy, region) {
            Ok(routes) if route_count + routes.len() > MAX_POOL_ROUTES => {
                rejected.push(PolicyRejection {
                    policy: policy.name_any(),
                    errors: vec![PolicyError {
                        kind: PolicyErrorKind::OverLimit,
                        field: "spec.routes".into(),
                        message: format!(
                            "ProviderPool {pool_name:?} already has {route_count} routes from older RoutingPolicies; these {} would pass its limit of {MAX_POOL_ROUTES} (split the pool, or merge routes)",
                            routes.len()
                        ),
                    }],
                });
            }
            Ok(routes) => {
                route_count += routes.len();
                accepted.push((policy, routes));
            }
            Err(errors) => rejected.push(PolicyRejection {
                policy: policy.name_any(),
                errors,
            }),
        }
    }

    // Cross-route references (fallbacks, redirects) must resolve against the merged set.
    // Rejecting a policy can break another's references, so repeat until nothing changes.
    loop {
        let (routes, conflicts) = merge(&accepted);
        let exact: BTreeSet<&str> = routes
            .iter()
            .filter(|r| !r.model.ends_with('*'))
            .map(|r| r.model.as_str())
            .collect();
        let mut dangling: BTreeMap<String, Vec<PolicyError>> = BTreeMap::new();
        for (policy, _) in &accepted {
            let errors = check_references(policy, &exact);
            if !errors.is_empty() {
                dangling.insert(policy.name_any(), errors);
            }
        }
        if dangling.is_empty() {
            let mut routes = routes;
            routes.sort_by(|a, b| route_order(&a.model).cmp(&route_order(&b.model)));
            return Ok(Compiled {
                config: GatewayConfig {
                    version: GATEWAY_CONFIG_VERSION,
                    namespace,
                    pool: pool_name,
                    region: region.to_owned(),
                    providers,
                    routes,
                },
                order,
                rejected,
                conflicts,
            });
        }
        accepted.retain(|(p, _)| !dangling.contains_key(&p.name_any()));
        rejected.extend(
            dangling
                .into_iter()
                .map(|(policy, errors)| PolicyRejection { policy, errors }),
        );
    }
}

/// Routes of a rejected policy that keep being served from the configuration in the
/// cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CarriedRoutes {
    /// RoutingPolicy name.
    pub policy: String,
    /// Public models still served as they were before the rejected edit.
    pub models: Vec<String>,
}

impl Compiled {
    /// Keeps serving, from `previous` (the configuration the region's gateways run now),
    /// the routes of every policy rejected in this compile: a bad edit must not take away
    /// routes that were serving. A kept route yields to any route compiled now for the
    /// same model; a provider it needs that the pool no longer has comes along from
    /// `previous` too, so the route works exactly as before. Policies deleted since are
    /// not rejected, so their routes go.
    pub fn carry_over(&mut self, previous: &GatewayConfig) -> Vec<CarriedRoutes> {
        let mut carried = Vec::new();
        for rejection in &self.rejected {
            let mut models = Vec::new();
            for route in previous
                .routes
                .iter()
                .filter(|r| r.policy == rejection.policy)
            {
                if self.config.routes.iter().any(|r| r.model == route.model) {
                    continue;
                }
                for target in &route.targets {
                    let known = self
                        .config
                        .providers
                        .iter()
                        .any(|p| p.name == target.provider);
                    if !known
                        && let Some(p) = previous
                            .providers
                            .iter()
                            .find(|p| p.name == target.provider)
                    {
                        self.config.providers.push(p.clone());
                    }
                }
                self.config.routes.push(route.clone());
                models.push(route.model.clone());
            }
            if !models.is_empty() {
                carried.push(CarriedRoutes {
                    policy: rejection.policy.clone(),
                    models,
                });
            }
        }
        self.config
            .routes
            .sort_by(|a, b| route_order(&a.model).cmp(&route_order(&b.model)));
        self.config.providers.sort_by(provider_order);
        carried
    }
}

impl Compiled {
    /// Drops whole policies, newest first, until the encoded configuration takes at most
    /// `max` bytes; each dropped policy is rejected saying so. The schemas bound every
    /// field, but long names and texts in many routes can still add up past what one
    /// ConfigMap holds, and a configuration that cannot be written would leave every
    /// policy's status claiming what the gateways do not run.
    pub fn fit(&mut self, max: usize) {
        let mut newest = self.order.clone();
        while !crate::gateway_config::fits(&self.config, max) {
            let Some(policy) = newest.pop() else { break };
            if !self.config.routes.iter().any(|r| r.policy == policy) {
                continue;
            }
            self.config.routes.retain(|r| r.policy != policy);
            let error = PolicyError {
                kind: PolicyErrorKind::OverLimit,
                field: "spec.routes".into(),
                message: format!(
                    "with this policy's routes the pool's compiled configuration takes more than the {max} bytes a ConfigMap can hold, encoded; the newest policies are left out until it fits (shorten texts and names, or split the pool)"
                ),
            };
            match self.rejected.iter_mut().find(|r| r.policy == policy) {
                Some(r) => r.errors.push(error),
                None => self.rejected.push(PolicyRejection {
                    policy,
                    errors: vec![error],
                }),
            }
        }
    }
}

/// Providers in config order: local ones first, then by name.
fn provider_order(a: &ProviderConfig, b: &ProviderConfig) -> std::cmp::Ordering {
    b.local.cmp(&a.local).then_with(|| a.name.cmp(&b.name))
}

/// Sort key: exact names first by name, then patterns by longest prefix.
fn route_order(model: &str) -> (bool, std::cmp::Reverse<usize>, &str) {
    match model.strip_suffix('*') {
        Some(prefix) => (true, std::cmp::Reverse(prefix.len()), model),
        None => (false, std::cmp::Reverse(0), model),
    }
}

/// Unions the routes of accepted policies; an older policy keeps a contested model.
fn merge(
    accepted: &[(&RoutingPolicy, Vec<RouteConfig>)],
) -> (Vec<RouteConfig>, Vec<RouteConflict>) {
    let mut owner: BTreeMap<String, String> = BTreeMap::new();
    let mut routes = Vec::new();
    let mut conflicts = Vec::new();
    for (policy, policy_routes) in accepted {
        for route in policy_routes {
            match owner.get(&route.model) {
                Some(winner) => conflicts.push(RouteConflict {
                    model: route.model.clone(),
                    winner: winner.clone(),
                    loser: policy.name_any(),
                }),
                None => {
                    owner.insert(route.model.clone(), policy.name_any());
                    routes.push(route.clone());
                }
            }
        }
    }
    (routes, conflicts)
}

fn check_references(policy: &RoutingPolicy, exact: &BTreeSet<&str>) -> Vec<PolicyError> {
    let mut errors = Vec::new();
    let known = || exact.iter().copied().collect::<Vec<_>>().join(", ");
    for (i, route) in policy.spec.routes.iter().enumerate() {
        let mut check = |field: String, model: &str| {
            if !exact.contains(model) {
                errors.push(PolicyError {
                    kind: PolicyErrorKind::UnknownModel,
                    field,
                    message: format!(
                        "model {model:?} has no route in this pool (routed models: {})",
                        known()
                    ),
                });
            }
        };
        for (j, fallback) in route.fallbacks.iter().enumerate() {
            check(format!("spec.routes[{i}].fallbacks[{j}]"), fallback);
        }
        if let Some(redirect) = &route.on_context_length_exceeded {
            check(
                format!("spec.routes[{i}].onContextLengthExceeded.model"),
                &redirect.model,
            );
        }
        if let Some(model) = route
            .on_content_policy
            .as_ref()
            .and_then(|a| a.model.as_deref())
        {
            check(format!("spec.routes[{i}].onContentPolicy.model"), model);
        }
    }
    errors
}

fn provider_config(p: &Provider, region: &str) -> ProviderConfig {
    ProviderConfig {
        name: p.name.clone(),
        provider_type: p.provider_type,
        endpoint: p.endpoint.trim_end_matches('/').to_owned(),
        region: p.region.clone(),
        local: p.region == region,
        enabled: p.enabled,
        credentials: p.credentials.as_ref().map(|c| c.secret_ref.clone()),
        azure_api_version: p.azure.as_ref().map(|a| a.api_version.clone()),
        anthropic: match p.provider_type {
            ProviderType::Anthropic => Some(p.anthropic.clone().unwrap_or_default()),
            _ => None,
        },
        limits: p.limits.clone().unwrap_or_default(),
        health: p.health.clone(),
    }
}

/// Compiles one policy's routes, or every error it has.
fn compile_policy(
    pool: &ProviderPool,
    policy: &RoutingPolicy,
    region: &str,
) -> Result<Vec<RouteConfig>, Vec<PolicyError>> {
    let spec = &policy.spec;
    let mut errors = Vec::new();
    let mut routes = Vec::new();
    for (i, route) in spec.routes.iter().enumerate() {
        match compile_route(pool, route, i, spec.regional, region) {
            Ok(targets) => routes.push(RouteConfig {
                model: route.model.clone(),
                policy: policy.name_any(),
                strategy: route.strategy,
                regional: spec.regional,
                targets,
                fallbacks: route.fallbacks.clone(),
                on_context_length_exceeded: route
                    .on_context_length_exceeded
                    .as_ref()
                    .map(|r| r.model.clone()),
                on_content_policy: route.on_content_policy.clone(),
                retry: spec.retry.clone(),
                timeouts: spec.timeouts.clone(),
                circuit_breaker: spec.circuit_breaker.clone(),
                degraded_response: spec.degraded_response.clone(),
                client_auth_secret: spec.client_auth.as_ref().map(|a| a.secret_ref.name.clone()),
                client_models: spec
                    .client_auth
                    .iter()
                    .flat_map(|a| &a.clients)
                    .map(|c| (c.name.clone(), c.models.clone()))
                    .collect(),
                idempotency_window: spec.idempotency.window,
            }),
            Err(mut route_errors) => errors.append(&mut route_errors),
        }
    }
    if errors.is_empty() {
        Ok(routes)
    } else {
        Err(errors)
    }
}

fn compile_route(
    pool: &ProviderPool,
    route: &Route,
    i: usize,
    regional: RegionalMode,
    region: &str,
) -> Result<Vec<TargetConfig>, Vec<PolicyError>> {
    let pattern = route.model.ends_with('*');
    let mut errors = Vec::new();
    let mut targets = Vec::new();
    for (j, target) in route.targets.iter().enumerate() {
        let Some(provider) = pool
            .spec
            .providers
            .iter()
            .find(|p| p.name == target.provider)
        else {
            errors.push(PolicyError {
                kind: PolicyErrorKind::UnknownProvider,
                field: format!("spec.routes[{i}].targets[{j}].provider"),
                message: format!(
                    "provider {:?} is not in ProviderPool {:?} (providers: {})",
                    target.provider,
                    pool.name_any(),
                    pool.spec
                        .providers
                        .iter()
                        .map(|p| p.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
            continue;
        };
        let wanted = target
            .model
            .as_deref()
            .or((!pattern).then_some(route.model.as_str()));
        let model = match wanted {
            Some(name) => match provider.models.iter().find(|m| m.name == name) {
                Some(m) => Some(m),
                None => {
                    errors.push(PolicyError {
                        kind: PolicyErrorKind::Unservable,
                        field: format!("spec.routes[{i}].targets[{j}]"),
                        message: format!(
                            "provider {:?} does not serve model {name:?} (it serves: {}); set targets[{j}].model to one of them",
                            provider.name,
                            provider.models.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", ")
                        ),
                    });
                    continue;
                }
            },
            None if provider.provider_type == ProviderType::AzureOpenAi => {
                errors.push(PolicyError {
                    kind: PolicyErrorKind::Unservable,
                    field: format!("spec.routes[{i}].targets[{j}].model"),
                    message: format!(
                        "pattern route {:?} must name a model for azureOpenAI provider {:?}: Azure serves deployments, not arbitrary model names",
                        route.model, provider.name
                    ),
                });
                continue;
            }
            None => None,
        };
        let remote = provider.region != region;
        if remote && regional == RegionalMode::LocalOnly {
            continue;
        }
        let priority = u32::try_from(target.priority.unwrap_or(provider.priority)).unwrap_or(0);
        let weight = u32::try_from(target.weight.unwrap_or(provider.weight)).unwrap_or(0);
        let spill = u32::from(remote && regional == RegionalMode::PreferLocal);
        targets.push(TargetConfig {
            provider: provider.name.clone(),
            upstream_model: model.map(|m| m.upstream.clone().unwrap_or_else(|| m.name.clone())),
            deployment: model.and_then(|m| m.deployment.clone()),
            context_window: model.and_then(|m| m.context_window),
            no_continuation: model.and_then(|m| m.continuation) == Some(Continuation::None),
            weight,
            priority,
            tier: priority * 2 + spill,
        });
    }
    if errors.is_empty() && targets.is_empty() {
        errors.push(PolicyError {
            kind: PolicyErrorKind::Unservable,
            field: format!("spec.routes[{i}].targets"),
            message: format!(
                "regional is localOnly but no target of model {:?} lives in region {region:?}; add a local provider or use preferLocal",
                route.model
            ),
        });
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    targets.sort_by(|a, b| {
        a.tier
            .cmp(&b.tier)
            .then_with(|| a.provider.cmp(&b.provider))
    });
    Ok(targets)
}
