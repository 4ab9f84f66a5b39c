//! How changes reach the reconciles. One watch per kind fills a [`Cache`]; each change
//! it sees becomes a reconcile request for the pools and policies that read it, and only
//! for those. The caches are loaded before the first reconcile runs and never waited
//! for inside one, so no reconcile can hold a worker while a cache fills.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use crds::k8s::Secret;
use crds::{ProviderPool, RoutingPolicy};
use futures_util::{Stream, StreamExt};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::runtime::controller::{Action, Config};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{applier, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::task::JoinHandle;

use crate::cache::{Caches, Change, Feed, Grouped, differs_beyond, served_routes};
use crate::controller::{Context, Error, error_policy, reconcile_policy, reconcile_pool};
use crate::events::Publisher;
use crate::metrics::Metrics;
use crate::render::MANAGER;
use crate::views::{DeploymentSummary, PodSummary};

/// Reconciles running at once per kind: keeps memory and API load flat when many pools
/// change together (a cold start over hundreds of pools).
const CONCURRENCY: u16 = 8;

/// A request waits this long for more about the same object, so the burst of child
/// events a rollout makes (creations, then several Deployment status updates) costs one
/// reconcile rather than one each.
const DEBOUNCE: Duration = Duration::from_millis(500);

/// Runs both controllers over one namespace (or all) until `shutdown` resolves.
pub async fn run(
    client: Client,
    events: Arc<Publisher>,
    gateway_image: String,
    metrics: Arc<Metrics>,
    namespace: Option<String>,
    shutdown: impl Future<Output = ()>,
) {
    let scope = namespace.as_deref().unwrap_or("all namespaces").to_owned();
    let work = async move {
        let ns = namespace.as_deref();
        let pools = Feed::<ProviderPool>::new();
        let policies = Feed::<RoutingPolicy>::new();
        let secrets = Feed::<Secret>::new();
        let deployments = Feed::<DeploymentSummary>::new();
        let config_maps = Feed::<ConfigMap>::new();
        let services = Feed::<Service>::new();
        let disruption_budgets = Feed::<PodDisruptionBudget>::new();
        let service_accounts = Feed::<ServiceAccount>::new();
        let roles = Feed::<Role>::new();
        let role_bindings = Feed::<RoleBinding>::new();
        let pods = Feed::<PodSummary>::new();
        let caches = Caches {
            pools: pools.cache(),
            policies: policies.cache(),
            secrets: secrets.cache(),
            deployments: deployments.cache(),
            config_maps: config_maps.cache(),
            services: services.cache(),
            disruption_budgets: disruption_budgets.cache(),
            service_accounts: service_accounts.cache(),
            roles: roles.cache(),
            role_bindings: role_bindings.cache(),
            pods: pods.cache(),
        };
        let (to_pools, pool_queue) = unbounded_channel();
        let (to_policies, policy_queue) = unbounded_channel();
        let wake = Wake {
            pools: to_pools,
            policies: to_policies,
            caches: caches.clone(),
        };

        // Initial lists come in pages (500 objects), so loading a cache never holds a
        // whole kind's JSON at once.
        let everything = watcher::Config::default();
        let ours = everything
            .clone()
            .labels(&format!("app.kubernetes.io/managed-by={MANAGER}"));
        let mut feeds = Feeds::default();
        let w = wake.clone();
        feeds.spawn(
            pools.run(api(&client, ns), everything.clone(), move |before, p, c| {
                w.pool_changed(before, p, c);
            }),
        );
        let w = wake.clone();
        feeds.spawn(
            policies.run(api(&client, ns), everything.clone(), move |before, p, c| {
                w.policy_changed(before, p, c);
            }),
        );
        let w = wake.clone();
        feeds.spawn(secrets.run(api(&client, ns), everything, move |_, s, _| {
            w.secret_changed(s);
        }));
        let w = wake.clone();
        feeds.spawn(
            config_maps.run(api(&client, ns), ours.clone(), move |before, cm, c| {
                w.config_map_changed(before, cm, c);
            }),
        );
        feeds.spawn(owned(&wake, deployments, api(&client, ns), &ours));
        feeds.spawn(owned(&wake, services, api(&client, ns), &ours));
        feeds.spawn(owned(&wake, disruption_budgets, api(&client, ns), &ours));
        feeds.spawn(owned(&wake, service_accounts, api(&client, ns), &ours));
        feeds.spawn(owned(&wake, roles, api(&client, ns), &ours));
        feeds.spawn(owned(&wake, role_bindings, api(&client, ns), &ours));
        // Pods wake nothing: a region that is not ready looks at them again on a timer.
        feeds.spawn(pods.run(api(&client, ns), ours, |_, _, _| {}));
        drop(wake);

        tracing::info!(scope = %namespace.as_deref().unwrap_or("all namespaces"), "loading the caches");
        let started = Instant::now();
        if let Err(e) = caches.loaded().await {
            tracing::error!(error = %e, "a cache stopped before it was loaded");
            return;
        }
        tracing::info!(
            seconds = started.elapsed().as_secs_f64(),
            pools = caches.pools.all().len(),
            policies = caches.policies.all().len(),
            "caches loaded; reconciling"
        );

        let config = Config::default()
            .concurrency(CONCURRENCY)
            .debounce(DEBOUNCE);
        let ctx = Arc::new(Context {
            events,
            client,
            gateway_image,
            metrics,
            caches: caches.clone(),
        });
        let pool_controller = applier(
            |pool, ctx| Task::spawn(reconcile_pool(pool, ctx)),
            error_policy,
            ctx.clone(),
            caches.pools.store(),
            queue(pool_queue),
            config.clone(),
        )
        .for_each(|_| async {});
        let policy_controller = applier(
            |policy, ctx| Task::spawn(reconcile_policy(policy, ctx)),
            error_policy,
            ctx,
            caches.policies.store(),
            queue(policy_queue),
            config,
        )
        .for_each(|_| async {});
        tokio::join!(pool_controller, policy_controller);
        drop(feeds);
    };
    // Reconciles are idempotent, so stopping mid-way is safe: the next leader redoes them.
    tokio::select! {
        () = work => {},
        () = shutdown => tracing::info!(%scope, "shutting down the controllers"),
    }
}

fn api<K>(client: &Client, ns: Option<&str>) -> Api<K>
where
    K: Resource<Scope = NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// A child kind's watch: a change wakes the pool that controls the child (a child
/// deleted or edited by hand is set back).
fn owned<K>(
    wake: &Wake,
    feed: Feed<K>,
    api: Api<K>,
    config: &watcher::Config,
) -> impl Future<Output = ()> + Send + 'static
where
    K: Grouped + serde::de::DeserializeOwned,
{
    let wake = wake.clone();
    feed.run(api, config.clone(), move |before, child, change| {
        if child_matters(before, child, change) {
            wake.child_changed(child);
        }
    })
}

/// The reconcile requests of a controller, as `applier` takes them.
fn queue<K: Resource>(
    mut requests: UnboundedReceiver<ObjectRef<K>>,
) -> impl Stream<Item = Result<ObjectRef<K>, Infallible>> {
    futures_util::stream::poll_fn(move |cx| requests.poll_recv(cx).map(|r| r.map(Ok)))
}

/// Turns what a watch saw into reconcile requests.
#[derive(Clone)]
struct Wake {
    pools: UnboundedSender<ObjectRef<ProviderPool>>,
    policies: UnboundedSender<ObjectRef<RoutingPolicy>>,
    caches: Caches,
}

impl Wake {
    fn pool(&self, ns: &str, name: &str) {
        // Fails only once the controllers have stopped.
        let _ = self.pools.send(ObjectRef::new(name).within(ns));
    }

    fn policies_of(&self, ns: &str, pool: &str) {
        for policy in self.caches.policies.group(ns, pool) {
            let _ = self.policies.send(ObjectRef::from_obj(policy.as_ref()));
        }
    }

    fn pool_changed(&self, before: Option<&ProviderPool>, pool: &ProviderPool, change: Change) {
        let (ns, name) = (pool.namespace().unwrap_or_default(), pool.name_any());
        if pool_calls_for_reconcile(before, pool, change) {
            self.pool(&ns, &name);
        }
        // A policy reads its pool's spec, never its status.
        if spec_changed(before, pool, change) {
            self.policies_of(&ns, &name);
        }
    }

    fn policy_changed(
        &self,
        before: Option<&RoutingPolicy>,
        policy: &RoutingPolicy,
        change: Change,
    ) {
        let ns = policy.namespace().unwrap_or_default();
        if policy_calls_for_reconcile(before, policy, change) {
            let _ = self.policies.send(ObjectRef::from_obj(policy));
        }
        // The pool compiles the policy's spec, and the pool's other policies may win or
        // lose a model to it; neither reads its status.
        if spec_changed(before, policy, change) {
            let pool = &policy.spec.pool_ref.name;
            self.pool(&ns, pool);
            self.policies_of(&ns, pool);
        }
    }

    fn secret_changed(&self, secret: &Secret) {
        let (ns, name) = (secret.namespace().unwrap_or_default(), secret.name_any());
        let uses = |pool: &ProviderPool| {
            pool.spec.providers.iter().any(|p| {
                p.credentials
                    .as_ref()
                    .is_some_and(|c| c.secret_ref.name == name)
            })
        };
        for pool in self.caches.pools.all() {
            if pool.namespace().as_deref() == Some(&ns) && uses(&pool) {
                self.pool(&ns, &pool.name_any());
            }
        }
        for policy in self.caches.policies.all() {
            if policy.namespace().as_deref() != Some(&ns) {
                continue;
            }
            let client_keys = policy
                .spec
                .client_auth
                .as_ref()
                .is_some_and(|a| a.secret_ref.name == name);
            let providers = self
                .caches
                .pools
                .get(&ns, &policy.spec.pool_ref.name)
                .is_some_and(|pool| uses(&pool));
            if client_keys || providers {
                let _ = self.policies.send(ObjectRef::from_obj(policy.as_ref()));
            }
        }
    }

    fn child_changed<K: Resource>(&self, child: &K) {
        let owner = child.owner_references().iter().find(|o| {
            o.controller == Some(true)
                && o.kind == ProviderPool::kind(&())
                && o.api_version == ProviderPool::api_version(&())
        });
        if let (Some(owner), Some(ns)) = (owner, child.namespace()) {
            self.pool(&ns, &owner.name);
        }
    }

    fn config_map_changed(&self, before: Option<&ConfigMap>, cm: &ConfigMap, change: Change) {
        if child_matters(before, cm, change) {
            self.child_changed(cm);
        }
        // What a policy says is served comes from its pool's ConfigMaps.
        let served_now = match change {
            Change::Applied => served_routes(cm),
            Change::Deleted => Vec::new(),
        };
        if before.map(served_routes).unwrap_or_default() != served_now
            && let (Some(ns), Some(pool)) = (cm.namespace(), cm.group())
        {
            self.policies_of(&ns, pool);
        }
    }
}

/// Whether a child's change calls for its pool's reconcile: a deletion, or a change to
/// one the cache held (a hand edit, a rollout's progress). A child new to the cache is the
/// echo of the reconcile that created it, or part of the first list, after which every
/// pool reconciles anyway; waking its pool again would only delay pools not yet created.
fn child_matters<K: Grouped>(before: Option<&K>, child: &K, change: Change) -> bool {
    match change {
        Change::Deleted => true,
        Change::Applied => before.is_some_and(|b| child.differs_from(b)),
    }
}

/// Whether a pool's change calls for its reconcile. The operator's own status writes come
/// back here and do not: only the rest of the pool does (its spec, and the provider health
/// the gateways report in its status).
fn pool_calls_for_reconcile(
    before: Option<&ProviderPool>,
    pool: &ProviderPool,
    change: Change,
) -> bool {
    let operators_status = |p: &mut ProviderPool| {
        if let Some(s) = &mut p.status {
            s.observed_generation = None;
            s.conditions.clear();
            s.ready_regions = None;
            s.healthy_providers = None;
            for r in &mut s.regions {
                r.desired_replicas = None;
                r.ready_replicas = None;
                r.config_revision = None;
            }
        }
    };
    change == Change::Applied && before.is_none_or(|b| differs_beyond(b, pool, operators_status))
}

/// Whether a policy's change calls for its reconcile: its status is the operator's alone,
/// so a write of it does not.
fn policy_calls_for_reconcile(
    before: Option<&RoutingPolicy>,
    policy: &RoutingPolicy,
    change: Change,
) -> bool {
    change == Change::Applied
        && before.is_none_or(|b| differs_beyond(b, policy, |p| p.status = None))
}

/// Whether `obj` is new, gone, or has a spec it did not have in `before`.
fn spec_changed<K: Resource>(before: Option<&K>, obj: &K, change: Change) -> bool {
    change == Change::Deleted
        || before
            .is_none_or(|b| (b.uid(), b.meta().generation) != (obj.uid(), obj.meta().generation))
}

/// The watch tasks; stopped with the controllers.
#[derive(Default)]
struct Feeds(Vec<JoinHandle<()>>);

impl Feeds {
    fn spawn(&mut self, feed: impl Future<Output = ()> + Send + 'static) {
        self.0.push(tokio::spawn(feed));
    }
}

impl Drop for Feeds {
    fn drop(&mut self) {
        for feed in &self.0 {
            feed.abort();
        }
    }
}

/// A reconcile on a task of its own, so reconciles spread over every core; cancelled
/// when dropped.
struct Task(JoinHandle<Result<Action, Error>>);

impl Task {
    fn spawn(reconcile: impl Future<Output = Result<Action, Error>> + Send + 'static) -> Self {
        Self(tokio::spawn(reconcile))
    }
}

impl Future for Task {
    type Output = Result<Action, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|joined| joined.unwrap_or_else(|e| Err(Error::Task(e.to_string()))))
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::{
        Change, child_matters, policy_calls_for_reconcile, pool_calls_for_reconcile, spec_changed,
    };
    use crds::{ProviderPool, RoutingPolicy};
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::ObjectMeta;
    use serde_json::json;

    fn object(uid: &str, generation: i64, rv: &str) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some("a".into()),
                namespace: Some("n".into()),
                uid: Some(uid.into()),
                generation: Some(generation),
                resource_version: Some(rv.into()),
                ..ObjectMeta::default()
            },
            ..ConfigMap::default()
        }
    }

    #[test]
    fn only_a_new_spec_or_a_deletion_counts_as_a_spec_change() {
        let seen = object("u", 1, "1");
        assert!(spec_changed(None, &seen, Change::Applied), "first sight");
        assert!(
            !spec_changed(Some(&seen), &object("u", 1, "2"), Change::Applied),
            "a status write"
        );
        assert!(
            spec_changed(Some(&seen), &object("u", 2, "3"), Change::Applied),
            "a spec edit"
        );
        assert!(spec_changed(Some(&seen), &seen, Change::Deleted), "deleted");
        assert!(
            spec_changed(Some(&seen), &object("v", 1, "4"), Change::Applied),
            "recreated under the same name"
        );
    }

    #[test]
    fn a_child_wakes_its_pool_when_changed_or_deleted_not_when_it_first_appears() {
        let created = object("u", 1, "1");
        assert!(
            !child_matters(None, &created, Change::Applied),
            "the echo of its creation"
        );
        assert!(
            !child_matters(Some(&created), &object("u", 1, "2"), Change::Applied),
            "a write that changed nothing cached"
        );
        let mut edited = object("u", 1, "3");
        edited.metadata.labels = Some([("team".to_owned(), "x".to_owned())].into());
        assert!(
            child_matters(Some(&created), &edited, Change::Applied),
            "edited"
        );
        assert!(
            child_matters(Some(&created), &created, Change::Deleted),
            "deleted"
        );
    }

    #[test]
    fn a_pools_own_status_write_wakes_nothing_but_gateway_health_does() {
        let pool = |rv: &str, ready: i32, health: &str| -> ProviderPool {
            serde_json::from_value(json!({
                "apiVersion": "switchyard.dev/v1alpha1", "kind": "ProviderPool",
                "metadata": {"name": "chat", "namespace": "n", "uid": "u", "generation": 1, "resourceVersion": rv},
                "spec": {"regions": [{"name": "us-east", "replicas": 1}],
                         "providers": [{"name": "a", "type": "openaiCompatible", "endpoint": "http://a", "region": "us-east", "models": [{"name": "m"}]}]},
                "status": {"readyRegions": format!("{ready}/1"),
                           "conditions": [{"type": "Ready", "status": if ready == 1 { "True" } else { "False" }, "reason": "R", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
                           "regions": [{"name": "us-east", "desiredReplicas": 1, "readyReplicas": ready,
                                        "providers": [{"name": "a", "state": health}]}]}
            }))
            .expect("pool")
        };
        let seen = pool("1", 0, "Unknown");
        assert!(
            pool_calls_for_reconcile(None, &seen, Change::Applied),
            "first sight"
        );
        assert!(
            !pool_calls_for_reconcile(Some(&seen), &pool("2", 1, "Unknown"), Change::Applied),
            "the operator's own status write"
        );
        assert!(
            pool_calls_for_reconcile(Some(&seen), &pool("3", 0, "Ejected"), Change::Applied),
            "provider health from the gateways"
        );
        let mut edited = pool("4", 0, "Unknown");
        edited.metadata.generation = Some(2);
        assert!(
            pool_calls_for_reconcile(Some(&seen), &edited, Change::Applied),
            "a spec edit"
        );
        assert!(
            !pool_calls_for_reconcile(Some(&seen), &seen, Change::Deleted),
            "a deleted pool has nothing left to reconcile"
        );
    }

    #[test]
    fn a_policys_status_write_wakes_nothing_but_an_edit_does() {
        let policy = |rv: &str, accepted: &str, label: &str| -> RoutingPolicy {
            serde_json::from_value(json!({
                "apiVersion": "switchyard.dev/v1alpha1", "kind": "RoutingPolicy",
                "metadata": {"name": "chat", "namespace": "n", "uid": "u", "generation": 1,
                             "resourceVersion": rv, "labels": {"team": label}},
                "spec": {"poolRef": {"name": "chat"}, "routes": [{"model": "m", "targets": [{"provider": "a"}]}]},
                "status": {"conditions": [{"type": "Accepted", "status": accepted, "reason": "R", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
            }))
            .expect("policy")
        };
        let seen = policy("1", "False", "a");
        assert!(
            policy_calls_for_reconcile(None, &seen, Change::Applied),
            "first sight"
        );
        assert!(
            !policy_calls_for_reconcile(Some(&seen), &policy("2", "True", "a"), Change::Applied),
            "the operator's own status write"
        );
        assert!(
            policy_calls_for_reconcile(Some(&seen), &policy("3", "False", "b"), Change::Applied),
            "a metadata edit"
        );
    }
}
