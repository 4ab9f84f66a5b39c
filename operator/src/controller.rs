//! The two reconciles. Each checks every property of the world, so it can be killed at
//! any line and resume correctly; it never branches on why it was called. They read the
//! world from [`Caches`] and write only where it differs from what they want, so a
//! reconcile that changes nothing sends no request at all.

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use crds::k8s::{Secret, Time};
use crds::{GatewayConfig, ProviderPool, RoutingPolicy, compile};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::cache::{CACHED_DATA_DIGEST, Cache, Caches, Grouped, data_digest, served_routes};
use crate::events::Publisher;
use crate::metrics::Metrics;
use crate::render::{
    HASH_ANNOTATION, MANAGER, REGION_LABEL, config_json, regional_name, render, revision, stamp,
};
use crate::status::{
    PolicyCompiled, PolicyFacts, Problem, RegionObservation, Stuck, policy_status,
    policy_status_changed, pool_status, pool_status_changed,
};
use crate::views::{DeploymentSummary, PodSummary};

/// Everything a reconcile can fail with; the variant names the metric label.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server refused or failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The object has no namespace (the CRDs are namespaced, so this is a bug upstream).
    #[error("object has no namespace")]
    NoNamespace,
    /// The reconcile's task panicked or was cancelled.
    #[error("reconcile task: {0}")]
    Task(String),
}

impl Error {
    /// Metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Kube(_) => "kube",
            Self::NoNamespace => "no_namespace",
            Self::Task(_) => "task",
        }
    }
}

/// Shared by every reconcile.
pub struct Context {
    /// Publishes Events when a condition flips.
    pub events: Arc<Publisher>,
    /// API client.
    pub client: Client,
    /// Gateway image for pools that name none.
    pub gateway_image: String,
    /// Metrics, shared by every watched namespace.
    pub metrics: Arc<Metrics>,
    /// What the reconciles read instead of asking the API server.
    pub caches: Caches,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("gateway_image", &self.gateway_image)
            .finish_non_exhaustive()
    }
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// How often a pool blocked by a child it cannot write looks again.
const BLOCKED_RECHECK: Duration = Duration::from_secs(15);
/// How often a pool with regions not ready looks at their pods again.
const ROLLOUT_RECHECK: Duration = Duration::from_secs(10);

/// Why a child could not be written.
#[derive(Debug)]
enum ChildFailure {
    /// Retrying will not help until someone changes something; said in the pool's status.
    Blocked(Problem),
    /// The API server was unreachable or overloaded; the reconcile is retried.
    Transient(Error),
}

impl From<kube::Error> for ChildFailure {
    fn from(e: kube::Error) -> Self {
        Self::Transient(Error::Kube(e))
    }
}

/// Whether `obj` is controlled by the object with `uid` (the pool).
fn controlled_by<K: Resource>(obj: &K, uid: &str) -> bool {
    obj.meta()
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.controller == Some(true) && o.uid == uid)
}

/// Sorts an API error into one a user must act on (the API server refused the object:
/// invalid, forbidden, too large) and one that retrying fixes.
fn refused(kind: &str, name: &str, e: kube::Error) -> ChildFailure {
    match e {
        kube::Error::Api(status)
            if (400..500).contains(&status.code) && !matches!(status.code, 408 | 409 | 429) =>
        {
            ChildFailure::Blocked(Problem {
                reason: "ChildRejected",
                message: format!("the API server refused {kind} {name:?}: {}", status.message),
            })
        }
        other => other.into(),
    }
}

/// Fields of a live child that people or tools may change by hand, which the operator
/// restores even though the content hash it stamped is unchanged.
trait Drift<Desired = Self> {
    /// Whether `self` (live, as cached) strays from `desired` in such a field.
    fn drifted(&self, _desired: &Desired) -> bool {
        false
    }
}

impl Drift for ServiceAccount {}
impl Drift for Role {}
impl Drift for RoleBinding {}
impl Drift for Service {}
impl Drift for PodDisruptionBudget {}

impl Drift for ConfigMap {
    /// An edited config would be served by every gateway of the region. A cached
    /// ConfigMap carries a digest of its data instead of the data.
    fn drifted(&self, desired: &Self) -> bool {
        match self.annotations().get(CACHED_DATA_DIGEST) {
            Some(digest) => *digest != data_digest(desired),
            None => self.data != desired.data || self.binary_data != desired.binary_data,
        }
    }
}

impl Drift<Deployment> for DeploymentSummary {
    /// `kubectl scale` by hand.
    fn drifted(&self, desired: &Deployment) -> bool {
        // Unset when someone else (an autoscaler) owns it.
        desired.spec.replicas.is_some() && self.spec.replicas != desired.spec.replicas
    }
}

/// Server-side applies `obj` unless the live object already carries the same content
/// hash and has not drifted. An object of that name that the pool does not control is
/// never touched: it was created by someone else, or belongs to another pool whose
/// children's names collide.
async fn apply<K, Desired>(
    api: &Api<K>,
    cache: &Cache<K>,
    mut obj: Desired,
    pool_uid: &str,
    metrics: &Metrics,
) -> Result<Arc<K>, ChildFailure>
where
    K: Grouped + DeserializeOwned + Drift<Desired>,
    Desired: Resource<DynamicType = ()> + Serialize + Debug,
{
    let hash = stamp(&mut obj);
    let name = obj.name_any();
    let kind = K::kind(&()).into_owned();
    // The cache holds only objects carrying the operator's label. One it lacks may still
    // exist (someone else's, or ours so new that its watch event is on the way), so it
    // is read before it would be created: creating costs one read more, nothing else does.
    let live = match cache.get(&obj.namespace().unwrap_or_default(), &name) {
        Some(live) => Some(live),
        None => api.get_opt(&name).await?.map(Arc::new),
    };
    if let Some(live) = live {
        if !controlled_by(live.as_ref(), pool_uid) {
            let owner = live
                .meta()
                .owner_references
                .iter()
                .flatten()
                .find(|o| o.controller == Some(true))
                .map_or_else(
                    || "nobody (it was not created by the operator)".to_owned(),
                    |o| format!("{} {:?}", o.kind, o.name),
                );
            return Err(ChildFailure::Blocked(Problem {
                reason: "NameConflict",
                message: format!(
                    "{kind} {name:?} already exists and is controlled by {owner}; the operator leaves it untouched. Delete or rename it, or rename this pool or region"
                ),
            }));
        }
        if live.annotations().get(HASH_ANNOTATION) == Some(&hash) && !live.drifted(&obj) {
            return Ok(live);
        }
    }
    metrics.write(&kind);
    api.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&obj),
    )
    .await
    .map(Arc::new)
    .map_err(|e| refused(&kind, &name, e))
}

/// Publishes one Event per condition that flipped between `before` and the `status` about
/// to be written: transitions only, never on a steady state.
async fn publish_transitions<K>(
    ctx: &Context,
    obj: &K,
    before: &[crds::k8s::Condition],
    status: &Value,
) where
    K: Resource<DynamicType = ()>,
{
    let after: Vec<crds::k8s::Condition> =
        serde_json::from_value(status["conditions"].clone()).unwrap_or_default();
    for (type_, state, reason) in crate::conditions::transitions(before, &after) {
        let good = !crate::conditions::warns(&type_, &state, &reason);
        let note = after
            .iter()
            .find(|c| c.type_ == type_)
            .map(|c| format!("{type_}={state}: {}", c.message));
        let event = Event {
            type_: if good {
                EventType::Normal
            } else {
                EventType::Warning
            },
            reason,
            note,
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = ctx.events.publish(&event, &obj.object_ref(&())).await {
            tracing::warn!(error = %e, "publishing an Event failed");
        }
    }
}

/// Server-side applies the status fields the operator owns.
async fn apply_status<K>(
    api: &Api<K>,
    name: &str,
    status: Value,
    metrics: &Metrics,
) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    metrics.write("status");
    let body = json!({"apiVersion": K::api_version(&()), "kind": K::kind(&()), "status": status});
    api.patch_status(
        name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(())
}

/// Deletes the pool's children of one kind that are not in `keep`: only objects the pool
/// controls, whatever labels others carry.
async fn prune<K>(
    api: &Api<K>,
    cache: &Cache<K>,
    ns: &str,
    pool: &str,
    pool_uid: &str,
    keep: &BTreeSet<String>,
    metrics: &Metrics,
) -> Result<(), Error>
where
    K: Grouped + DeserializeOwned,
{
    for obj in cache.group(ns, pool) {
        let name = obj.name_any();
        if keep.contains(&name)
            || !controlled_by(obj.as_ref(), pool_uid)
            || obj.meta().deletion_timestamp.is_some()
        {
            continue;
        }
        metrics.write("delete");
        tracing::info!(kind = %K::kind(&()), %name, "pruning a child no longer wanted");
        match api.delete(&name, &DeleteParams::background()).await {
            // Gone already; the cache has not heard yet.
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(e) => return Err(e.into()),
            Ok(_) => {}
        }
    }
    Ok(())
}

fn names<K: Resource>(objects: &[K]) -> BTreeSet<String> {
    objects.iter().map(ResourceExt::name_any).collect()
}

/// Writes every child of `pool` and deletes those no longer wanted; returns what each
/// region's Deployment shows. Stops at the first child that cannot be written, before
/// deleting anything.
async fn apply_children(
    pool: &ProviderPool,
    configs: &[crds::GatewayConfig],
    ctx: &Context,
    ns: &str,
) -> Result<Vec<RegionObservation>, ChildFailure> {
    let name = pool.name_any();
    let uid = pool.uid().unwrap_or_default();
    let client = &ctx.client;
    let c = &ctx.caches;
    let children = render(pool, configs, &ctx.gateway_image);
    let m = &ctx.metrics;
    let keep_cms = names(&children.config_maps);
    let keep_svcs = names(&children.services);
    let keep_pdbs = names(&children.disruption_budgets);
    let keep_deploys = names(&children.deployments);
    let sas = Api::<ServiceAccount>::namespaced(client.clone(), ns);
    let roles = Api::<Role>::namespaced(client.clone(), ns);
    let bindings = Api::<RoleBinding>::namespaced(client.clone(), ns);
    let cms = Api::<ConfigMap>::namespaced(client.clone(), ns);
    let svcs = Api::<Service>::namespaced(client.clone(), ns);
    let pdbs = Api::<PodDisruptionBudget>::namespaced(client.clone(), ns);
    let deploys = Api::<DeploymentSummary>::namespaced(client.clone(), ns);
    apply(&sas, &c.service_accounts, children.service_account, &uid, m).await?;
    apply(&roles, &c.roles, children.role, &uid, m).await?;
    apply(&bindings, &c.role_bindings, children.role_binding, &uid, m).await?;
    for cm in children.config_maps {
        apply(&cms, &c.config_maps, cm, &uid, m).await?;
    }
    for svc in children.services {
        apply(&svcs, &c.services, svc, &uid, m).await?;
    }
    for pdb in children.disruption_budgets {
        apply(&pdbs, &c.disruption_budgets, pdb, &uid, m).await?;
    }
    // Last: their pods need the identity and the configuration above.
    let mut lives = Vec::new();
    for d in children.deployments {
        lives.push(apply(&deploys, &c.deployments, d, &uid, m).await?);
    }
    let mut observations = Vec::new();
    for (i, live) in lives.into_iter().enumerate() {
        let region = &pool.spec.regions[i];
        let desired = if pool.spec.gateway.external_replicas {
            live.spec.replicas.unwrap_or(1)
        } else {
            region.replicas
        };
        let ready = live
            .status
            .as_ref()
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0);
        let stuck = if ready < desired {
            stuck_pods(&c.pods, ns, &name, &region.name)
        } else {
            None
        };
        observations.push(RegionObservation {
            name: region.name.clone(),
            desired,
            ready,
            revision: revision(&config_json(&configs[i])),
            routes: configs[i].routes.len(),
            stuck,
        });
    }
    let transient = ChildFailure::Transient;
    prune(&deploys, &c.deployments, ns, &name, &uid, &keep_deploys, m)
        .await
        .map_err(transient)?;
    prune(&cms, &c.config_maps, ns, &name, &uid, &keep_cms, m)
        .await
        .map_err(transient)?;
    prune(&svcs, &c.services, ns, &name, &uid, &keep_svcs, m)
        .await
        .map_err(transient)?;
    prune(&pdbs, &c.disruption_budgets, ns, &name, &uid, &keep_pdbs, m)
        .await
        .map_err(transient)?;
    Ok(observations)
}

/// Container waiting reasons that do not pass by themselves.
const STUCK_WAITING: [&str; 6] = [
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CrashLoopBackOff",
    "CreateContainerConfigError",
    "CreateContainerError",
];

/// Why a region's gateway pods do not become ready, if one of them says: the scheduler
/// found no node, or a container cannot start. A rollout that merely takes time says
/// nothing here.
fn stuck_pods(pods: &Cache<PodSummary>, ns: &str, pool: &str, region: &str) -> Option<Stuck> {
    for pod in pods.group(ns, pool).iter().filter(|p| {
        p.metadata.deletion_timestamp.is_none()
            && p.labels().get(REGION_LABEL).map(String::as_str) == Some(region)
    }) {
        let Some(status) = &pod.status else { continue };
        let unschedulable = status.conditions.iter().find(|c| {
            c.type_ == "PodScheduled"
                && c.status == "False"
                && c.reason.as_deref() == Some("Unschedulable")
        });
        if let Some(c) = unschedulable {
            return Some(Stuck {
                reason: "PodsUnschedulable",
                message: format!(
                    "pods cannot be scheduled: {}",
                    c.message.as_deref().unwrap_or("no node fits").trim()
                ),
            });
        }
        for c in &status.container_statuses {
            let Some(waiting) = c.state.as_ref().and_then(|s| s.waiting.as_ref()) else {
                continue;
            };
            let Some(reason) = waiting.reason.as_deref() else {
                continue;
            };
            if STUCK_WAITING.contains(&reason) {
                let detail = waiting
                    .message
                    .as_deref()
                    .map(|m| format!(": {}", m.trim()))
                    .unwrap_or_default();
                return Some(Stuck {
                    reason: "PodsNotStarting",
                    message: format!(
                        "pod {:?} container {:?} is waiting with {reason}{detail}",
                        pod.name_any(),
                        c.name
                    ),
                });
            }
        }
    }
    None
}

/// The configuration a region's gateways run now, from the pool's own ConfigMap (read
/// from the API server only when the cache has not seen it yet).
async fn running_config(
    cms: &Api<ConfigMap>,
    cache: &Cache<ConfigMap>,
    ns: &str,
    name: &str,
    pool_uid: &str,
) -> Result<Option<GatewayConfig>, Error> {
    // The cache keeps only a digest of the data, so it is read (only while a policy edit
    // is rejected); one the cache knows to be someone else's is not.
    if cache
        .get(ns, name)
        .is_some_and(|cm| !controlled_by(cm.as_ref(), pool_uid))
    {
        return Ok(None);
    }
    let Some(cm) = cms.get_opt(name).await? else {
        return Ok(None);
    };
    if !controlled_by(&cm, pool_uid) {
        return Ok(None);
    }
    Ok(crds::decode_config(cm.data.as_ref(), cm.binary_data.as_ref()).ok())
}

/// Models of `policy` that the pool's gateways serve now, in any region.
fn served_in_cluster(
    cms: &Cache<ConfigMap>,
    ns: &str,
    pool: &str,
    policy: &str,
) -> BTreeSet<String> {
    cms.group(ns, pool)
        .iter()
        .flat_map(|cm| served_routes(cm))
        .filter(|(p, _)| p == policy)
        .map(|(_, model)| model)
        .collect()
}

/// Why a policy's route for `model` is not served: `winner` claimed it first. Creation
/// times have one-second resolution, so a tie is broken by name and said to be one.
fn conflict_text(model: &str, winner: &str, same_second: bool) -> String {
    if same_second {
        format!(
            "model {model:?} is served by RoutingPolicy {winner:?}, created in the same second, which keeps it because its name sorts first"
        )
    } else {
        format!("model {model:?} is already served by the older RoutingPolicy {winner:?}")
    }
}

/// How fallback cycles are resolved, for an accepted policy's message.
fn cycle_note(spec: &crds::RoutingPolicySpec) -> String {
    let groups = spec.fallback_cycles();
    if groups.is_empty() {
        return String::new();
    }
    let groups: Vec<String> = groups
        .iter()
        .map(|g| format!("({})", g.join(", ")))
        .collect();
    format!(
        "; the fallbacks of {} lead back to one another, so a request tries each of those models at most once",
        groups.join(" and ")
    )
}

/// Reconciles a ProviderPool into its regional gateways and its status.
pub async fn reconcile_pool(pool: Arc<ProviderPool>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile("ProviderPool");
    let ns = pool.namespace().ok_or(Error::NoNamespace)?;
    let name = pool.name_any();
    let client = ctx.client.clone();
    let policies = ctx.caches.policies_of(&ns, &name);

    let mut configs = Vec::new();
    let mut problem = None;
    let cms = Api::<ConfigMap>::namespaced(client.clone(), &ns);
    let uid = pool.uid().unwrap_or_default();
    for region in &pool.spec.regions {
        match compile(&pool, &policies, &region.name) {
            Ok(mut compiled) => {
                if !compiled.rejected.is_empty()
                    && let Some(previous) = running_config(
                        &cms,
                        &ctx.caches.config_maps,
                        &ns,
                        &regional_name(&name, &region.name),
                        &uid,
                    )
                    .await?
                {
                    for kept in compiled.carry_over(&previous) {
                        tracing::info!(pool = %name, region = %region.name, policy = %kept.policy, models = ?kept.models, "a rejected policy edit: its previous routes stay");
                    }
                }
                compiled.fit(crds::CONFIG_MAP_DATA_MAX);
                configs.push(compiled.config);
            }
            Err(e) => {
                problem = Some(Problem {
                    reason: "InvalidConfiguration",
                    message: e.to_string(),
                });
            }
        }
    }

    let mut observations = Vec::new();
    if problem.is_none() {
        match apply_children(&pool, &configs, &ctx, &ns).await {
            Ok(seen) => observations = seen,
            Err(ChildFailure::Blocked(p)) => {
                tracing::warn!(pool = %name, reason = p.reason, message = %p.message, "a child cannot be written");
                problem = Some(p);
            }
            Err(ChildFailure::Transient(e)) => return Err(e),
        }
    }
    let missing = missing_credentials(&pool, &ctx.caches.secrets, &ns);
    let status = pool_status(&pool, &observations, problem.as_ref(), &missing, &now());
    let ready = status["conditions"].as_array().is_some_and(|c| {
        c.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    });
    ctx.metrics.pool_ready(&ns, &name, ready);
    if pool_status_changed(pool.status.as_ref(), &status) {
        let before = pool
            .status
            .as_ref()
            .map(|s| s.conditions.clone())
            .unwrap_or_default();
        publish_transitions(&ctx, pool.as_ref(), &before, &status).await;
        apply_status(
            &Api::<ProviderPool>::namespaced(client, &ns),
            &name,
            status,
            &ctx.metrics,
        )
        .await?;
    }
    // An object in the way is not ours to watch: look again now and then, so the pool
    // recovers once someone removes it.
    if problem
        .as_ref()
        .is_some_and(|p| p.reason != "InvalidConfiguration")
    {
        return Ok(Action::requeue(BLOCKED_RECHECK));
    }
    // Pods that cannot be scheduled or started do not change the Deployment: look
    // at them again until the region is ready.
    if observations.iter().any(|r| r.ready < r.desired) {
        return Ok(Action::requeue(ROLLOUT_RECHECK));
    }
    Ok(Action::await_change())
}

/// Reconciles a RoutingPolicy's status: does it compile, do its references resolve.
pub async fn reconcile_policy(
    policy: Arc<RoutingPolicy>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile("RoutingPolicy");
    let ns = policy.namespace().ok_or(Error::NoNamespace)?;
    let name = policy.name_any();
    let client = ctx.client.clone();
    let pool_name = &policy.spec.pool_ref.name;
    let pool = ctx.caches.pools.get(&ns, pool_name);
    let secrets = &ctx.caches.secrets;

    let facts = match &pool {
        None => PolicyFacts::PoolMissing {
            namespace: ns.clone(),
        },
        Some(pool) => {
            let policies = ctx.caches.policies_of(&ns, pool_name);
            let mut seen = PolicyCompiled::default();
            for region in &pool.spec.regions {
                let Ok(mut out) = compile(pool, &policies, &region.name) else {
                    continue;
                };
                out.fit(crds::CONFIG_MAP_DATA_MAX);
                for r in out.rejected.iter().filter(|r| r.policy == name) {
                    seen.errors.extend(r.errors.iter().cloned());
                }
                for c in out.conflicts.iter().filter(|c| c.loser == name) {
                    let created = |policy: &str| {
                        policies
                            .iter()
                            .find(|p| p.name_any() == policy)
                            .and_then(|p| p.metadata.creation_timestamp.as_ref())
                            .map(|t| t.0)
                    };
                    seen.conflicts.push(conflict_text(
                        &c.model,
                        &c.winner,
                        created(&c.winner) == created(&name),
                    ));
                }
                seen.compiled.extend(
                    out.config
                        .routes
                        .iter()
                        .filter(|r| r.policy == name)
                        .map(|r| r.model.clone()),
                );
            }
            seen.in_cluster = served_in_cluster(&ctx.caches.config_maps, &ns, pool_name, &name);
            seen.missing_secrets = missing_secrets(pool, &policy, secrets, &ns);
            seen.cycle_note = cycle_note(&policy.spec);
            PolicyFacts::Compiled(seen)
        }
    };
    let existing = policy.status.clone().unwrap_or_default();
    let desired = policy_status(&policy, &facts, &now());
    if policy_status_changed(&existing, &desired) {
        publish_transitions(&ctx, policy.as_ref(), &existing.conditions, &desired).await;
        apply_status(
            &Api::<RoutingPolicy>::namespaced(client, &ns),
            &name,
            desired,
            &ctx.metrics,
        )
        .await?;
    }
    Ok(Action::await_change())
}

/// Providers whose credentials Secret or key is missing, naming the field.
fn missing_credentials(pool: &ProviderPool, secrets: &Cache<Secret>, ns: &str) -> Vec<String> {
    let mut missing = Vec::new();
    for (i, p) in pool.spec.providers.iter().enumerate() {
        let Some(creds) = &p.credentials else {
            continue;
        };
        let r = &creds.secret_ref;
        let why = match secrets.get(ns, &r.name) {
            None => "not found",
            Some(s)
                if !s.data.as_ref().is_some_and(|d| d.contains_key(&r.key))
                    && !s
                        .string_data
                        .as_ref()
                        .is_some_and(|d| d.contains_key(&r.key)) =>
            {
                "has no key"
            }
            Some(_) => continue,
        };
        let detail = if why == "not found" {
            format!("Secret {:?} not found", r.name)
        } else {
            format!("Secret {:?} has no key {:?}", r.name, r.key)
        };
        missing.push(format!(
            "spec.providers[{i}].credentials.secretRef: {detail}, so provider {:?} cannot be used",
            p.name
        ));
    }
    missing
}

/// Secret references of the policy (its client keys, and the credentials of every
/// provider its routes target) that do not resolve, each naming the field.
fn missing_secrets(
    pool: &ProviderPool,
    policy: &RoutingPolicy,
    secrets: &Cache<Secret>,
    ns: &str,
) -> Vec<String> {
    let mut missing = Vec::new();
    let check = |secret: Option<Arc<Secret>>, key: Option<&str>| match (secret, key) {
        (None, _) => Some("not found"),
        (Some(s), Some(key)) => {
            let has = s.data.as_ref().is_some_and(|d| d.contains_key(key))
                || s.string_data.as_ref().is_some_and(|d| d.contains_key(key));
            (!has).then_some("has no such key")
        }
        (Some(_), None) => None,
    };
    if let Some(auth) = &policy.spec.client_auth {
        let name = &auth.secret_ref.name;
        let secret = secrets.get(ns, name);
        // An allow-list entry naming no client in the Secret would limit nobody.
        if let Some(secret) = &secret {
            for (i, c) in auth.clients.iter().enumerate() {
                if let Some(why) = check(Some(secret.clone()), Some(&c.name)) {
                    missing.push(format!(
                        "spec.clientAuth.clients[{i}].name: Secret {name:?} {why} {:?}",
                        c.name
                    ));
                }
            }
        }
        if let Some(why) = check(secret, None) {
            missing.push(format!(
                "spec.clientAuth.secretRef.name: Secret {name:?} {why}"
            ));
        }
    }
    let targeted: BTreeSet<&str> = policy
        .spec
        .routes
        .iter()
        .flat_map(|r| r.targets.iter().map(|t| t.provider.as_str()))
        .collect();
    for (i, p) in pool.spec.providers.iter().enumerate() {
        let Some(creds) = p
            .credentials
            .as_ref()
            .filter(|_| targeted.contains(p.name.as_str()))
        else {
            continue;
        };
        let r = &creds.secret_ref;
        if let Some(why) = check(secrets.get(ns, &r.name), Some(&r.key)) {
            missing.push(format!(
                "provider {:?} (ProviderPool {:?} spec.providers[{i}].credentials.secretRef): Secret {:?} {why}{}",
                p.name,
                pool.name_any(),
                r.name,
                if why == "has no such key" { format!(" {:?}", r.key) } else { String::new() }
            ));
        }
    }
    missing
}

/// Counts the failure and retries the object in a few seconds.
pub(crate) fn error_policy<K>(_obj: Arc<K>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.error(error.label());
    tracing::warn!(error = %error, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

#[cfg(test)]
mod tests {
    use super::conflict_text;

    #[test]
    fn a_same_second_tie_is_not_called_older() {
        assert_eq!(
            conflict_text("m", "a", false),
            "model \"m\" is already served by the older RoutingPolicy \"a\""
        );
        let tie = conflict_text("m", "a", true);
        assert!(
            !tie.contains("older")
                && tie.contains("same second")
                && tie.contains("name sorts first"),
            "{tie}"
        );
    }
}
