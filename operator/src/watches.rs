//! How changes reach the reconciles. One watch per kind fills a [`Cache`]; each change
//! it sees becomes a reconcile request for the pools and policies that read it, and only
//! for those. The caches are loaded before the first reconcile runs and never waited
//! for inside one, so no reconcile can hold a worker while a cache fills.

use std::collections::HashMap;
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
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::runtime::controller::{Action, Config};
use kube::runtime::events::Recorder;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{applier, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::task::JoinHandle;

use crate::cache::{Caches, Change, Feed, Grouped};
use crate::controller::{Context, Error, error_policy, reconcile_policy, reconcile_pool};
use crate::metrics::Metrics;
use crate::render::MANAGER;

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
    recorder: Recorder,
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
        let deployments = Feed::<Deployment>::new();
        let config_maps = Feed::<ConfigMap>::new();
        let services = Feed::<Service>::new();
        let disruption_budgets = Feed::<PodDisruptionBudget>::new();
        let service_accounts = Feed::<ServiceAccount>::new();
        let roles = Feed::<Role>::new();
        let role_bindings = Feed::<RoleBinding>::new();
        let pods = Feed::<Pod>::new();
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
        let mut specs = Specs::default();
        feeds.spawn(
            pools.run(api(&client, ns), everything.clone(), move |p, c| {
                w.pool_changed(p, c, &mut specs);
            }),
        );
        let w = wake.clone();
        let mut specs = Specs::default();
        feeds.spawn(
            policies.run(api(&client, ns), everything.clone(), move |p, c| {
                w.policy_changed(p, c, &mut specs);
            }),
        );
        let w = wake.clone();
        feeds.spawn(secrets.run(api(&client, ns), everything, move |s, _| {
            w.secret_changed(s);
        }));
        let w = wake.clone();
        feeds.spawn(
            config_maps.run(api(&client, ns), ours.clone(), move |cm, _| {
                w.config_map_changed(cm);
            }),
        );
        feeds.spawn(owned(&wake, deployments, api(&client, ns), &ours));
        feeds.spawn(owned(&wake, services, api(&client, ns), &ours));
        feeds.spawn(owned(&wake, disruption_budgets, api(&client, ns), &ours));
        feeds.spawn(owned(&wake, service_accounts, api(&client, ns), &ours));
        feeds.spawn(owned(&wake, roles, api(&client, ns), &ours));
        feeds.spawn(owned(&wake, role_bindings, api(&client, ns), &ours));
        // Pods wake nothing: a region that is not ready looks at them again on a timer.
        feeds.spawn(pods.run(api(&client, ns), ours, |_, _| {}));
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
            recorder,
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
    feed.run(api, config.clone(), move |child, _| {
        wake.child_changed(child)
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

    fn pool_changed(&self, pool: &ProviderPool, change: Change, specs: &mut Specs) {
        let (ns, name) = (pool.namespace().unwrap_or_default(), pool.name_any());
        if change == Change::Applied {
            // Its status too: the gateways report provider health there.
            self.pool(&ns, &name);
        }
        // A policy reads its pool's spec, never its status, which changes several times
        // during every rollout.
        if specs.changed(pool, change) {
            self.policies_of(&ns, &name);
        }
    }

    fn policy_changed(&self, policy: &RoutingPolicy, change: Change, specs: &mut Specs) {
        let ns = policy.namespace().unwrap_or_default();
        if change == Change::Applied {
            let _ = self.policies.send(ObjectRef::from_obj(policy));
        }
        // The pool compiles the policy's spec, and the pool's other policies may win or
        // lose a model to it; neither reads its status.
        if specs.changed(policy, change) {
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

    fn config_map_changed(&self, cm: &ConfigMap) {
        self.child_changed(cm);
        // What a policy says is served comes from its pool's ConfigMaps.
        if let (Some(ns), Some(pool)) = (cm.namespace(), cm.group()) {
            self.policies_of(&ns, pool);
        }
    }
}

/// The last (uid, generation) seen of each object: tells spec changes from status and
/// metadata writes.
#[derive(Default)]
struct Specs(HashMap<(String, String), (Option<String>, Option<i64>)>);

impl Specs {
    /// Whether `obj` is new, gone, or has a spec it did not have when last seen.
    fn changed<K: Resource>(&mut self, obj: &K, change: Change) -> bool {
        let key = (obj.namespace().unwrap_or_default(), obj.name_any());
        if change == Change::Deleted {
            self.0.remove(&key);
            return true;
        }
        let seen = (obj.uid(), obj.meta().generation);
        self.0.insert(key, seen.clone()) != Some(seen)
    }
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
    use super::{Change, Specs};
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::ObjectMeta;

    fn object(generation: i64, rv: &str) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some("a".into()),
                namespace: Some("n".into()),
                uid: Some("u".into()),
                generation: Some(generation),
                resource_version: Some(rv.into()),
                ..ObjectMeta::default()
            },
            ..ConfigMap::default()
        }
    }

    #[test]
    fn only_a_new_spec_or_a_deletion_counts_as_a_spec_change() {
        let mut specs = Specs::default();
        assert!(
            specs.changed(&object(1, "1"), Change::Applied),
            "first sight"
        );
        assert!(
            !specs.changed(&object(1, "2"), Change::Applied),
            "a status write"
        );
        assert!(
            specs.changed(&object(2, "3"), Change::Applied),
            "a spec edit"
        );
        assert!(specs.changed(&object(2, "3"), Change::Deleted), "deleted");
        assert!(specs.changed(&object(2, "4"), Change::Applied), "recreated");
    }
}
