//! What the reconciles read: one watch per kind fills a cache (a kube-runtime reflector
//! store), so a reconcile that changes nothing asks the API server nothing. Each cache is
//! loaded before any reconcile runs; a reconcile never waits for one.
//!
//! Children are watched by the operator's `managed-by` label only, so an object someone
//! else created under a child's name is not in the cache: [`crate::controller`] reads it
//! from the API server before it would create the child, and leaves it alone.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt::Debug;
use std::sync::{Arc, PoisonError, RwLock};

use crds::k8s::Secret;
use crds::{ProviderPool, RoutingPolicy};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::runtime::reflector::store::Writer;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;

use crate::render::POOL_LABEL;
use crate::views::{DeploymentSummary, PodSummary};

/// How a cached object is grouped for [`Cache::group`]: children by the pool they serve,
/// policies by the pool they name.
pub trait Grouped:
    Resource<DynamicType = ()> + Clone + Debug + PartialEq + Send + Sync + 'static
{
    /// The pool this object belongs to, if it is grouped at all.
    fn group(&self) -> Option<&str> {
        self.labels().get(POOL_LABEL).map(String::as_str)
    }

    /// Drops what no reconcile reads, before the object is cached (memory at scale).
    fn trim(&mut self) {
        self.managed_fields_mut().clear();
    }

    /// Whether `self` differs from `before` (both as cached) in anything a reconcile
    /// reads, or only in the resourceVersion every write moves.
    fn differs_from(&self, before: &Self) -> bool {
        differs_beyond(before, self, |_| {})
    }
}

/// Whether `now` differs from `before` in more than the resourceVersion (which every write
/// moves) and what `ignore` clears.
pub fn differs_beyond<K: Resource + Clone + PartialEq>(
    before: &K,
    now: &K,
    ignore: impl Fn(&mut K),
) -> bool {
    let relevant = |obj: &K| {
        let mut obj = obj.clone();
        obj.meta_mut().resource_version = None;
        ignore(&mut obj);
        obj
    };
    relevant(before) != relevant(now)
}

/// Set on a cached ConfigMap in place of its data (never written to the API server): a
/// digest of the data, to tell whether it differs from the desired one.
pub const CACHED_DATA_DIGEST: &str = "switchyard.dev/cached-data-digest";
/// Set on a cached ConfigMap in place of its data: the (policy, model) pairs its
/// compiled configuration serves, as JSON.
pub const CACHED_SERVED: &str = "switchyard.dev/cached-served";

/// A digest of a ConfigMap's data (SHA-256, so an edit cannot be made to look unchanged).
pub fn data_digest(cm: &ConfigMap) -> String {
    let bytes = serde_json::to_vec(&(&cm.data, &cm.binary_data)).unwrap_or_default();
    let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The (policy, model) pairs a cached gateway ConfigMap serves (see its `trim`).
pub fn served_routes(cm: &ConfigMap) -> Vec<(String, String)> {
    cm.annotations()
        .get(CACHED_SERVED)
        .and_then(|served| serde_json::from_str(served).ok())
        .unwrap_or_default()
}

/// The (policy, model) pairs a ConfigMap's compiled configuration serves; none if it does
/// not decode.
fn decoded_routes(cm: &ConfigMap) -> Vec<(String, String)> {
    crds::decode_config(cm.data.as_ref(), cm.binary_data.as_ref())
        .map(|config| {
            config
                .routes
                .into_iter()
                .map(|r| (r.policy, r.model))
                .collect()
        })
        .unwrap_or_default()
}

// The compiled configuration is most of a ConfigMap, and most of the cache at scale: a
// reconcile needs only whether it differs from the desired one and which policies' models
// it serves, so those replace it. (A rejected policy edit, which needs the previous
// configuration itself, reads it from the API server.)
impl Grouped for ConfigMap {
    fn trim(&mut self) {
        self.managed_fields_mut().clear();
        let digest = data_digest(self);
        // Decoded from the data, whatever annotations the live object carries.
        let served = serde_json::to_string(&decoded_routes(self)).unwrap_or_default();
        let annotations = self.annotations_mut();
        annotations.insert(CACHED_DATA_DIGEST.to_owned(), digest);
        annotations.insert(CACHED_SERVED.to_owned(), served);
        self.data = None;
        self.binary_data = None;
    }
}

// For these a reconcile reads only the metadata: the hash annotation, the owner, the
// labels (no field of theirs is restored by hand-edit detection).
impl Grouped for Service {
    fn trim(&mut self) {
        self.managed_fields_mut().clear();
        self.spec = None;
        self.status = None;
    }
}

impl Grouped for PodDisruptionBudget {
    fn trim(&mut self) {
        self.managed_fields_mut().clear();
        self.spec = None;
        self.status = None;
    }
}

impl Grouped for ServiceAccount {}

impl Grouped for Role {
    fn trim(&mut self) {
        self.managed_fields_mut().clear();
        self.rules = None;
    }
}

impl Grouped for RoleBinding {
    fn trim(&mut self) {
        self.managed_fields_mut().clear();
        self.subjects = None;
    }
}

impl Grouped for DeploymentSummary {}

impl Grouped for PodSummary {}

/// `kubectl apply` keeps a copy of the whole object in this annotation; nothing here
/// reads it.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

impl Grouped for RoutingPolicy {
    fn group(&self) -> Option<&str> {
        Some(&self.spec.pool_ref.name)
    }

    fn trim(&mut self) {
        self.managed_fields_mut().clear();
        self.annotations_mut().remove(LAST_APPLIED);
    }
}

impl Grouped for ProviderPool {
    fn group(&self) -> Option<&str> {
        None
    }

    fn trim(&mut self) {
        self.managed_fields_mut().clear();
        self.annotations_mut().remove(LAST_APPLIED);
    }
}

impl Grouped for Secret {
    fn group(&self) -> Option<&str> {
        None
    }

    /// Only which keys exist matters: values (and annotations, where `kubectl apply`
    /// copies them) never stay in the operator's memory.
    fn trim(&mut self) {
        self.managed_fields_mut().clear();
        self.annotations_mut().clear();
        self.string_data = None;
        for value in self.data.iter_mut().flat_map(|d| d.values_mut()) {
            value.0.clear();
        }
    }
}

/// Names by (namespace, group). A superset of what the store holds: every read is
/// checked against the store, and the index is rebuilt after each (re)list.
type Index = HashMap<(String, String), BTreeSet<String>>;

/// A reflector store of one kind plus an index by [`Grouped::group`].
pub struct Cache<K: Grouped> {
    store: Store<K>,
    index: Arc<RwLock<Index>>,
}

impl<K: Grouped> Clone for Cache<K> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            index: self.index.clone(),
        }
    }
}

impl<K: Grouped> Debug for Cache<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("kind", &K::kind(&()))
            .field("objects", &self.store.len())
            .finish()
    }
}

/// The version of `obj` the cache holds.
fn cached_version<K: Grouped>(cache: &Cache<K>, obj: &K) -> Option<Arc<K>> {
    cache.get(&obj.namespace().unwrap_or_default(), &obj.name_any())
}

fn group_key<K: Grouped>(obj: &K) -> Option<(String, String)> {
    Some((obj.namespace().unwrap_or_default(), obj.group()?.to_owned()))
}

impl<K: Grouped> Cache<K> {
    fn new(writer: &Writer<K>) -> Self {
        Self {
            store: writer.as_reader(),
            index: Arc::default(),
        }
    }

    /// A loaded cache holding exactly `objects` (trimmed), fed by no watch: for tests and
    /// tools that need a reconcile's view of a world.
    pub fn filled(objects: impl IntoIterator<Item = K>) -> Self {
        let mut writer = Writer::default();
        let cache = Self::new(&writer);
        writer.apply_watcher_event(&watcher::Event::Init);
        for mut obj in objects {
            obj.trim();
            writer.apply_watcher_event(&watcher::Event::InitApply(obj));
        }
        writer.apply_watcher_event(&watcher::Event::InitDone);
        cache.rebuild();
        cache
    }

    /// The object `name` in `ns`, as last seen.
    pub fn get(&self, ns: &str, name: &str) -> Option<Arc<K>> {
        self.store.get(&ObjectRef::new(name).within(ns))
    }

    /// The objects of `group` in `ns`, by name.
    pub fn group(&self, ns: &str, group: &str) -> Vec<Arc<K>> {
        let index = self.index.read().unwrap_or_else(PoisonError::into_inner);
        let Some(names) = index.get(&(ns.to_owned(), group.to_owned())) else {
            return Vec::new();
        };
        names
            .iter()
            .filter_map(|name| self.get(ns, name))
            .filter(|obj| obj.group() == Some(group))
            .collect()
    }

    /// The store, for a controller reading its main kind.
    pub fn store(&self) -> Store<K> {
        self.store.clone()
    }

    /// Every cached object.
    pub fn all(&self) -> Vec<Arc<K>> {
        self.store.state()
    }

    /// Waits until the first list has been loaded.
    pub async fn loaded(&self) -> Result<(), reflector::store::WriterDropped> {
        self.store.wait_until_ready().await
    }

    fn note(&self, obj: &K) {
        if let Some(key) = group_key(obj) {
            self.index
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(key)
                .or_default()
                .insert(obj.name_any());
        }
    }

    fn forget(&self, obj: &K) {
        if let Some(key) = group_key(obj) {
            let mut index = self.index.write().unwrap_or_else(PoisonError::into_inner);
            if let Some(names) = index.get_mut(&key) {
                names.remove(&obj.name_any());
                if names.is_empty() {
                    index.remove(&key);
                }
            }
        }
    }

    /// After a (re)list, objects deleted while the watch was down left no Delete event.
    fn rebuild(&self) {
        let mut fresh = Index::new();
        for obj in self.store.state() {
            if let Some(key) = group_key(obj.as_ref()) {
                fresh.entry(key).or_default().insert(obj.name_any());
            }
        }
        *self.index.write().unwrap_or_else(PoisonError::into_inner) = fresh;
    }
}

/// A change the watch of a cache saw, after the cache took it in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Listed, created or modified.
    Applied,
    /// Deleted.
    Deleted,
}

/// A cache and the watch that fills it. [`Feed::run`] drives the watch, telling `notify`
/// of every change once the cache holds it, with the version the cache held before.
pub struct Feed<K: Grouped> {
    cache: Cache<K>,
    writer: Writer<K>,
    /// During a (re)list: what the cache held that the list has not shown yet. Whatever is
    /// left at its end was deleted while the watch was down, which no Delete event says.
    unlisted: Option<HashSet<ObjectRef<K>>>,
}

impl<K: Grouped> Debug for Feed<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Feed").field("cache", &self.cache).finish()
    }
}

impl<K> Feed<K>
where
    K: Grouped + DeserializeOwned,
{
    /// An empty cache and its writer.
    pub fn new() -> Self {
        let writer = Writer::default();
        Self {
            cache: Cache::new(&writer),
            writer,
            unlisted: None,
        }
    }

    /// The cache this feed fills.
    pub fn cache(&self) -> Cache<K> {
        self.cache.clone()
    }

    /// Watches `api` (with `config`) until dropped. Watch errors are logged and retried
    /// with backoff; they never reach a reconcile.
    pub async fn run(
        mut self,
        api: Api<K>,
        config: watcher::Config,
        mut notify: impl FnMut(Option<&K>, &K, Change) + Send,
    ) {
        let kind = K::kind(&());
        let events = watcher(api, config)
            .default_backoff()
            .modify(|obj: &mut K| obj.trim());
        let mut events = std::pin::pin!(events);
        while let Some(event) = events.next().await {
            match event {
                Ok(event) => self.absorb(event, &mut notify),
                Err(e) => tracing::warn!(%kind, error = %e, "watch failed; retrying"),
            }
        }
    }

    /// Takes one watch event into the cache and tells `notify`, with what the cache held
    /// before; a relist's end tells of what vanished meanwhile as deleted.
    fn absorb(
        &mut self,
        event: watcher::Event<K>,
        notify: &mut impl FnMut(Option<&K>, &K, Change),
    ) {
        let cache = &self.cache;
        // Read before the cache takes the event in: a change is told from the echo of a
        // write by what the cache held.
        let before = match &event {
            watcher::Event::Apply(obj)
            | watcher::Event::InitApply(obj)
            | watcher::Event::Delete(obj) => cached_version(cache, obj),
            watcher::Event::Init | watcher::Event::InitDone => None,
        };
        let mut vanished = Vec::new();
        match &event {
            watcher::Event::Init => {
                self.unlisted = Some(
                    cache
                        .store
                        .state()
                        .iter()
                        .map(|o| ObjectRef::from_obj(o.as_ref()))
                        .collect(),
                );
            }
            watcher::Event::InitApply(obj) => {
                if let Some(unlisted) = &mut self.unlisted {
                    unlisted.remove(&ObjectRef::from_obj(obj));
                }
            }
            watcher::Event::InitDone => {
                vanished = self
                    .unlisted
                    .take()
                    .into_iter()
                    .flatten()
                    .filter_map(|key| cache.store.get(&key))
                    .collect();
            }
            watcher::Event::Apply(_) | watcher::Event::Delete(_) => {}
        }
        self.writer.apply_watcher_event(&event);
        match event {
            watcher::Event::Apply(obj) | watcher::Event::InitApply(obj) => {
                cache.note(&obj);
                notify(before.as_deref(), &obj, Change::Applied);
            }
            watcher::Event::Delete(obj) => {
                cache.forget(&obj);
                notify(before.as_deref(), &obj, Change::Deleted);
            }
            watcher::Event::InitDone => {
                cache.rebuild();
                for obj in vanished {
                    notify(Some(&obj), &obj, Change::Deleted);
                }
            }
            watcher::Event::Init => {}
        }
    }
}

impl<K> Default for Feed<K>
where
    K: Grouped + DeserializeOwned,
{
    fn default() -> Self {
        Self::new()
    }
}

/// Everything a reconcile reads.
#[derive(Debug, Clone)]
pub struct Caches {
    /// ProviderPools.
    pub pools: Cache<ProviderPool>,
    /// RoutingPolicies, grouped by the pool they name.
    pub policies: Cache<RoutingPolicy>,
    /// Secrets: names and keys only.
    pub secrets: Cache<Secret>,
    /// The children, grouped by pool.
    pub deployments: Cache<DeploymentSummary>,
    /// One per region.
    pub config_maps: Cache<ConfigMap>,
    /// Regional and pool-wide.
    pub services: Cache<Service>,
    /// Where a region has more than one replica.
    pub disruption_budgets: Cache<PodDisruptionBudget>,
    /// The gateways' identity.
    pub service_accounts: Cache<ServiceAccount>,
    /// What the gateways may do.
    pub roles: Cache<Role>,
    /// Binds the role to the account.
    pub role_bindings: Cache<RoleBinding>,
    /// Gateway pods, to say why a region is not ready.
    pub pods: Cache<PodSummary>,
}

impl Caches {
    /// Waits until every cache has its first list.
    pub async fn loaded(&self) -> Result<(), reflector::store::WriterDropped> {
        self.pools.loaded().await?;
        self.policies.loaded().await?;
        self.secrets.loaded().await?;
        self.deployments.loaded().await?;
        self.config_maps.loaded().await?;
        self.services.loaded().await?;
        self.disruption_budgets.loaded().await?;
        self.service_accounts.loaded().await?;
        self.roles.loaded().await?;
        self.role_bindings.loaded().await?;
        self.pods.loaded().await
    }

    /// The policies that name `pool`, as `compile` takes them.
    pub fn policies_of(&self, ns: &str, pool: &str) -> Vec<RoutingPolicy> {
        self.policies
            .group(ns, pool)
            .iter()
            .map(|p| RoutingPolicy::clone(p))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::{Change, Feed};
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::ResourceExt;
    use kube::api::ObjectMeta;
    use kube::runtime::watcher::Event;

    fn cm(name: &str, rv: &str) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("n".into()),
                resource_version: Some(rv.into()),
                ..ObjectMeta::default()
            },
            ..ConfigMap::default()
        }
    }

    #[test]
    fn a_relist_tells_of_what_was_deleted_while_the_watch_was_down() {
        let mut feed = Feed::<ConfigMap>::new();
        let cache = feed.cache();
        let mut seen = Vec::new();
        let mut notify = |before: Option<&ConfigMap>, obj: &ConfigMap, change| {
            seen.push((obj.name_any(), before.is_some(), change));
        };
        for event in [
            Event::Init,
            Event::InitApply(cm("kept", "1")),
            Event::InitApply(cm("gone", "2")),
            Event::InitDone,
            Event::Apply(cm("kept", "3")),
            // The watch broke; "gone" was deleted meanwhile.
            Event::Init,
            Event::InitApply(cm("kept", "4")),
            Event::InitDone,
        ] {
            feed.absorb(event, &mut notify);
        }
        assert_eq!(
            seen,
            [
                ("kept".to_owned(), false, Change::Applied),
                ("gone".to_owned(), false, Change::Applied),
                ("kept".to_owned(), true, Change::Applied),
                ("kept".to_owned(), true, Change::Applied),
                ("gone".to_owned(), true, Change::Deleted),
            ]
        );
        assert!(cache.get("n", "gone").is_none());
        assert_eq!(
            cache.get("n", "kept").and_then(|c| c.resource_version()),
            Some("4".to_owned())
        );
    }
}
