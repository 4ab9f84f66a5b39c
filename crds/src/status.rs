//! Status of the Switchyard resources, by Kubernetes API conventions.
//!
//! Conditions are a list keyed by `type`. `Ready` is the summary tools such as kstatus
//! and Argo CD read. The pool's per-region and per-provider entries are lists keyed by
//! name, so each region's gateways can server-side-apply their own provider health
//! without touching what the operator or other regions own.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Condition types and their stable reasons.
pub mod conditions {
    /// Summary: the resource does what it says.
    pub const READY: &str = "Ready";
    /// The operator is still rolling out a change.
    pub const PROGRESSING: &str = "Progressing";
    /// Serving, but with less redundancy than asked for.
    pub const DEGRADED: &str = "Degraded";
    /// The policy compiles against its pool.
    pub const ACCEPTED: &str = "Accepted";
    /// Every reference of the policy (pool, providers, Secrets) exists.
    pub const RESOLVED_REFS: &str = "ResolvedRefs";
}

/// Observed state of a ProviderPool.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ProviderPoolStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Ready`, `Progressing` and `Degraded`, each with a stable reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// Regions whose gateways are all ready, out of all regions, such as `2/3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_regions: Option<String>,

    /// Providers healthy in at least one region, out of all enabled providers, such as `3/4`;
    /// providers drained with `enabled: false` follow, as in `3/4, 1 drained`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_providers: Option<String>,

    /// Per-region gateway rollout and provider health.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub regions: Vec<RegionStatus>,
}

/// One region's gateways, as observed.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RegionStatus {
    /// Region name.
    pub name: String,

    /// Gateway replicas asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,

    /// Gateway replicas ready to serve.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,

    /// Revision (content hash) of the configuration the operator wrote for this region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_revision: Option<String>,

    /// Provider health as this region's gateways observe it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub providers: Vec<ProviderHealthStatus>,
}

/// A provider's health as one region's gateways see it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ProviderHealthStatus {
    /// Provider name.
    pub name: String,

    /// `Healthy`, `Degraded` (errors or a failed active probe, but serving), `Ejected` (not
    /// sent traffic for now) or `Unknown` (no traffic and no active probe seen yet).
    pub state: HealthState,

    /// Why, in one CamelCase word: `Errors`, `Slow`, `RateLimited`, `BreakerOpen`,
    /// `Ejected`, `ProbeFailed`, `MissingCredentials`, `NoTrafficYet`, or `ProbeSucceeded`
    /// (healthy by active probes before any request reached it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,

    /// A human-readable detail. Never holds secrets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,

    /// Share of failed requests over the last minute, as a decimal string such as `0.02`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_rate: Option<String>,

    /// Recent latency to response headers (an exponentially weighted mean), in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<i64>,

    /// When `state` last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
}

/// Provider health as gateways observe it.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum HealthState {
    /// Serving normally.
    Healthy,
    /// Serving, with errors or rate limiting.
    Degraded,
    /// Not sent traffic until its ejection or open breaker ends.
    Ejected,
    /// Not observed yet.
    #[default]
    Unknown,
}

/// Observed state of a RoutingPolicy.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RoutingPolicyStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Accepted` (the policy compiles against its pool) and `ResolvedRefs` (its pool,
    /// providers and Secrets exist), each with a message naming the field at fault.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// The public models this policy serves, comma-separated (the `Routes` column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes: Option<String>,
}
