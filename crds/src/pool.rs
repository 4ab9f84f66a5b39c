//! `ProviderPool`: the upstream LLM providers a team can route to, and the regions its
//! gateways run in.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::duration::Duration;
use crate::status::ProviderPoolStatus;

/// The label that pins a region's gateways to its nodes unless a region overrides it.
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";

/// A set of upstream LLM providers and the regions where Switchyard runs gateways for them.
///
/// The operator runs one gateway Deployment, Service and ConfigMap per region listed in
/// `spec.regions`. RoutingPolicies that reference this pool decide how each public model
/// name is served by these providers.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "switchyard.dev",
    version = "v1alpha1",
    kind = "ProviderPool",
    plural = "providerpools",
    singular = "providerpool",
    shortname = "pp",
    shortname = "pool",
    category = "switchyard",
    namespaced,
    status = "ProviderPoolStatus",
    derive = "PartialEq",
    doc = "A set of upstream LLM providers and the regions where Switchyard runs gateways for them.",
    // The pool's name becomes its Services' names, which must be DNS-1035 labels.
    validation = Rule::new("self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')").message("metadata.name: a ProviderPool's name names its gateway Services, so it must be a DNS-1035 label: lowercase letters, digits and '-', starting with a letter, without dots"),
    // Each region's Service is `<pool>-<region>`, a DNS-1035 label of at most 63 characters.
    validation = Rule::new("self.spec.regions.all(r, size(self.metadata.name) + size(r.name) <= 62)").message("metadata.name: each region's gateway Service is named <pool>-<region>, which may have at most 63 characters; shorten the pool's name or the longest region name"),
    printcolumn(
        name = "Regions",
        type_ = "string",
        json_path = ".status.readyRegions",
        description = "Regions with every gateway replica ready, out of all regions"
    ),
    printcolumn(
        name = "Providers",
        type_ = "string",
        json_path = ".status.healthyProviders",
        description = "Healthy providers, out of all enabled providers"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
// clippy reads the repeated `type_ = ...` of separate printcolumns as duplicates.
#[allow(clippy::duplicated_attributes)]
pub struct ProviderPoolSpec {
    /// Regions to run gateways in. Each region gets its own gateway Deployment, Service and
    /// compiled configuration, and prefers the providers that live in it.
    #[schemars(length(min = 1, max = 16))]
    #[x_kube(
        merge_strategy = ListMerge::Map(vec!["name".into()]),
        validation = Rule::new("self.all(r, self.exists_one(o, o.name == r.name))").message("region names must be unique within a pool")
    )]
    pub regions: Vec<Region>,

    /// Settings shared by the gateways of every region.
    #[serde(default)]
    pub gateway: GatewaySettings,

    /// The upstream providers (at most 32). A RoutingPolicy refers to them by `name`.
    #[schemars(length(min = 1, max = 32))]
    #[x_kube(
        merge_strategy = ListMerge::Map(vec!["name".into()]),
        validation = Rule::new("self.all(p, self.exists_one(o, o.name == p.name))").message("provider names must be unique within a pool")
    )]
    pub providers: Vec<Provider>,
}

/// A region where the pool runs gateways.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Region {
    /// Region name, such as `us-east`. Gateways are placed on nodes labelled
    /// `topology.kubernetes.io/region=<name>` unless `nodeSelector` says otherwise, and
    /// providers whose `region` matches are preferred by this region's gateways.
    #[schemars(
        length(min = 1, max = 40),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,

    /// Number of gateway replicas in this region.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 100))]
    pub replicas: i32,

    /// Node labels the region's gateway pods must match. Defaults to
    /// `topology.kubernetes.io/region: <name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "node_selector_schema")]
    pub node_selector: Option<BTreeMap<String, String>>,

    /// Compute resources of each gateway container in this region; overrides
    /// `spec.gateway.resources`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Tolerations added to this region's gateway pods, for regions on tainted nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub tolerations: Option<Vec<Toleration>>,
}

fn node_selector_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "nullable": true,
        "maxProperties": 16,
        "additionalProperties": {"type": "string", "maxLength": 63},
    })
}

fn default_replicas() -> i32 {
    2
}

impl Region {
    /// The node selector that pins this region's gateways: the explicit one, or the
    /// region label.
    pub fn effective_node_selector(&self) -> BTreeMap<String, String> {
        self.node_selector
            .clone()
            .unwrap_or_else(|| BTreeMap::from([(REGION_LABEL.to_owned(), self.name.clone())]))
    }
}

/// Settings of the gateway pods, shared by every region.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.adminPort != self.port").message("adminPort must differ from port").field_path(".adminPort"),
)]
pub struct GatewaySettings {
    /// Gateway container image. Defaults to the image the operator was installed with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,

    /// Port the gateway serves the OpenAI API on, inside the pod and on its Services.
    #[serde(default = "default_gateway_port")]
    #[schemars(range(min = 1024, max = 65535))]
    pub port: i32,

    /// Port of the gateway's `/metrics` and `/status` (providers, routes and their health)
    /// inside the pod. It is not on the pool's Services, so clients cannot read them;
    /// scrape the pods on it.
    #[serde(default = "default_admin_port")]
    #[schemars(range(min = 1024, max = 65535))]
    pub admin_port: i32,

    /// Leave each region's Deployment `replicas` to someone else, typically a
    /// HorizontalPodAutoscaler targeting the Deployment `<pool>-<region>`: the operator
    /// then neither sets nor restores it, `regions[].replicas` is ignored, and status
    /// reports what the Deployment asks for. When false (the default) the operator owns
    /// `replicas` and sets it back within seconds if anyone changes it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub external_replicas: bool,

    /// Default compute resources of each gateway container; a region may override them.
    /// Without either, gateways request 100m CPU and 128Mi memory, with a 512Mi memory
    /// limit and no CPU limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// PEM certificates of private CAs that providers' certificates may chain to (such as
    /// the internal CA of a self-hosted model server), from a ConfigMap in the pool's
    /// namespace. They are trusted in addition to the public web PKI roots. Gateways read
    /// them at start-up, so a changed bundle applies as their pods restart.
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "trustedCA")]
    pub trusted_ca: Option<ConfigMapKeyRef>,

    /// Send OpenTelemetry traces of the gateways' requests to a collector: a span per
    /// client request and one per try of a provider, with the GenAI semantic-convention
    /// attributes. Off when unset. Changing it rolls the gateways (without dropping
    /// requests), as it is read at start-up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<TracingSettings>,
}

/// Where the gateways export traces, and how many.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TracingSettings {
    /// Base URL of an OTLP/HTTP collector (protobuf encoding, usually port 4318), such as
    /// `http://otel-collector.observability:4318`; spans are posted to
    /// `<endpoint>/v1/traces`. `https` collectors are verified like providers (web PKI
    /// roots plus `trustedCA`). No credentials in the URL.
    #[schemars(
        length(min = 8, max = 512),
        regex(pattern = r"^https?://[^\s/?#@]+(/[^\s?#]*)?$")
    )]
    pub endpoint: String,

    /// Share of requests traced, from 0 to 1, when the client's own trace context does not
    /// decide: a request whose `traceparent` says sampled is always traced, one that says
    /// not sampled never is.
    #[serde(default = "default_sampling_ratio")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub sampling_ratio: f64,
}

fn default_sampling_ratio() -> f64 {
    1.0
}

/// A key of a ConfigMap in the same namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapKeyRef {
    /// Name of the ConfigMap.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,

    /// The key holding the PEM bundle.
    #[serde(default = "default_ca_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

fn default_ca_key() -> String {
    "ca.crt".to_owned()
}

fn default_gateway_port() -> i32 {
    8080
}

fn default_admin_port() -> i32 {
    9090
}

impl Default for GatewaySettings {
    fn default() -> Self {
        Self {
            image: None,
            port: default_gateway_port(),
            admin_port: default_admin_port(),
            external_replicas: false,
            resources: None,
            trusted_ca: None,
            tracing: None,
        }
    }
}

/// The wire format a provider speaks.
#[derive(
    JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
#[serde(rename_all = "camelCase")]
pub enum ProviderType {
    /// OpenAI's API (`/v1/chat/completions`, `Authorization: Bearer`).
    #[serde(rename = "openai")]
    OpenAi,
    /// Azure OpenAI: deployment paths, `api-version` query, `api-key` header.
    #[serde(rename = "azureOpenAI")]
    AzureOpenAi,
    /// Anthropic's Messages API; the gateway translates OpenAI requests to it and back.
    #[serde(rename = "anthropic")]
    Anthropic,
    /// Any server speaking the OpenAI API (vLLM, llama.cpp, Ollama, other gateways).
    #[serde(rename = "openaiCompatible")]
    OpenAiCompatible,
}

impl ProviderType {
    /// The name users write in a manifest.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OpenAi => "openai",
            Self::AzureOpenAi => "azureOpenAI",
            Self::Anthropic => "anthropic",
            Self::OpenAiCompatible => "openaiCompatible",
        }
    }
}

/// One upstream provider endpoint.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.type == 'azureOpenAI' ? has(self.azure) : !has(self.azure)").message("azure (with apiVersion) is required when type is azureOpenAI and not allowed for other types").field_path(".azure"),
    validation = Rule::new("!has(self.anthropic) || self.type == 'anthropic'").message("anthropic settings are only allowed when type is anthropic").field_path(".anthropic"),
    validation = Rule::new("self.type == 'openaiCompatible' || has(self.credentials)").message("credentials are required for openai, azureOpenAI and anthropic providers; only openaiCompatible servers may be keyless").field_path(".credentials"),
    validation = Rule::new("self.type != 'azureOpenAI' || self.models.all(m, has(m.deployment))").message("every model of an azureOpenAI provider needs a deployment").field_path(".models"),
    validation = Rule::new("self.type == 'azureOpenAI' || self.models.all(m, !has(m.deployment))").message("deployment is only for azureOpenAI providers; use upstream to rename a model for other types").field_path(".models"),
    validation = Rule::new("self.type == 'anthropic' || self.type == 'openaiCompatible' || self.models.all(m, !has(m.continuation) || m.continuation == 'none')").message("continuation: prefill is only possible for anthropic and openaiCompatible providers; openai and azureOpenAI start a new answer instead").field_path(".models"),
)]
pub struct Provider {
    /// Name of the provider, unique in the pool; RoutingPolicy targets refer to it.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,

    /// Wire format: `openai`, `azureOpenAI`, `anthropic` or `openaiCompatible`.
    #[serde(rename = "type")]
    pub provider_type: ProviderType,

    /// Base URL of the provider, such as `https://api.openai.com` or
    /// `https://contoso-eastus.openai.azure.com`. For an OpenAI-compatible server include
    /// any path prefix before `/v1`.
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(
        validation = Rule::new("isURL(self) && (self.startsWith('https://') || self.startsWith('http://'))").message("endpoint must be an absolute http:// or https:// URL, such as https://api.openai.com"),
        validation = Rule::new("self.matches('^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]')").message("endpoint must name a host, such as https://api.openai.com"),
        // The endpoint is copied into the gateways' ConfigMap, which the built-in `view`
        // role can read.
        validation = Rule::new("!self.matches('^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@')").message("endpoint must not carry credentials (user:password@host): it is copied into a ConfigMap anyone with the view role can read; put the key in credentials.secretRef"),
    )]
    pub endpoint: String,

    /// The region the provider's endpoint lives in. Gateways prefer providers of their own
    /// region and spill to others only when local ones cannot serve. It need not be one of
    /// the pool's gateway regions.
    #[schemars(
        length(min = 1, max = 40),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub region: String,

    /// Where the API key lives. Optional only for keyless `openaiCompatible` servers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<Credentials>,

    /// The models this provider serves (at most 32), by public name.
    #[schemars(length(min = 1, max = 32))]
    #[x_kube(
        merge_strategy = ListMerge::Map(vec!["name".into()]),
        validation = Rule::new("self.all(m, self.exists_one(o, o.name == m.name))").message("model names must be unique within a provider")
    )]
    pub models: Vec<ProviderModel>,

    /// Azure OpenAI settings; required when `type` is `azureOpenAI`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azure: Option<AzureSettings>,

    /// Anthropic settings; only for `type: anthropic`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anthropic: Option<AnthropicSettings>,

    /// Share of traffic relative to the other providers of the same priority tier, used
    /// by the `weighted` strategy when a route target sets no weight of its own. 0 takes
    /// traffic only when nothing else in the tier can.
    #[serde(default = "default_weight")]
    #[schemars(range(min = 0, max = 10000))]
    pub weight: i32,

    /// Priority tier; 0 is served first. A higher tier takes traffic only while no
    /// provider of a lower tier is usable. A route target may override it.
    #[serde(default)]
    #[schemars(range(min = 0, max = 9))]
    pub priority: i32,

    /// Limits the provider enforces on this account; the gateway spreads load to stay
    /// under them and the `capacity` strategy routes by what remains.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,

    /// How the gateway decides the provider is unhealthy and for how long to avoid it.
    #[serde(default)]
    pub health: HealthCheck,

    /// Set to false to drain the provider: no new requests are sent to it, but it stays in
    /// the pool and its configuration is kept.
    #[serde(default = "default_true")]
    pub enabled: bool,
}

fn default_weight() -> i32 {
    100
}

fn default_true() -> bool {
    true
}

/// A reference to a key of a Secret in the pool's namespace.
#[derive(
    KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret, in the same namespace.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,

    /// Key in the Secret's data holding the value.
    #[serde(default = "default_secret_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

fn default_secret_key() -> String {
    "apiKey".to_owned()
}

/// How the gateway authenticates to a provider.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Credentials {
    /// The Secret key holding the provider's API key. The key never leaves the Secret:
    /// gateways read it at run time and it is never copied into a ConfigMap or status.
    pub secret_ref: SecretKeyRef,
}

/// A model a provider serves.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProviderModel {
    /// The public model name clients ask for and routes refer to, such as `gpt-4o`.
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._:/@-]*$")
    )]
    pub name: String,

    /// The model name sent to the provider, when it differs from `name`
    /// (for example `claude-sonnet-4-5` for the public `claude-sonnet`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub upstream: Option<String>,

    /// Azure OpenAI deployment serving this model; required for `azureOpenAI` providers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 64),
        regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    )]
    pub deployment: Option<String>,

    /// Context window in tokens, used to route requests that would not fit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100_000_000))]
    pub context_window: Option<i64>,

    /// Whether the model continues a partial answer sent to it as a final assistant
    /// message (a prefill), which is how a stream that broke mid-answer resumes on it:
    /// `prefill` or `none`. Unset means what the provider's type supports: `prefill` for
    /// `anthropic` and `openaiCompatible` (vLLM's and llama.cpp's
    /// `continue_final_message`), `none` for `openai` and `azureOpenAI`, which start a new
    /// answer instead. A model that refuses a continuation with a 400 or 422 is not asked
    /// for one again by that gateway replica until it restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub continuation: Option<Continuation>,
}

/// Whether a model can continue a partial answer.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum Continuation {
    /// It continues a final assistant message.
    Prefill,
    /// It cannot; a broken stream does not resume on it.
    None,
}

/// Azure OpenAI specifics.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AzureSettings {
    /// The `api-version` query parameter, such as `2024-10-21`.
    #[schemars(
        length(min = 1, max = 32),
        regex(pattern = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}(-preview)?$")
    )]
    pub api_version: String,
}

/// Anthropic specifics.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AnthropicSettings {
    /// The `anthropic-version` header sent with every request.
    #[serde(default = "default_anthropic_version")]
    #[schemars(length(min = 1, max = 32))]
    pub version: String,

    /// `max_tokens` sent when the client's request sets none (Anthropic requires one).
    #[serde(default = "default_anthropic_max_tokens")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub default_max_tokens: i32,
}

fn default_anthropic_version() -> String {
    "2023-06-01".to_owned()
}

fn default_anthropic_max_tokens() -> i32 {
    4096
}

impl Default for AnthropicSettings {
    fn default() -> Self {
        Self {
            version: default_anthropic_version(),
            default_max_tokens: default_anthropic_max_tokens(),
        }
    }
}

/// Limits of the provider account.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    /// Requests per minute the provider allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000_000))]
    pub requests_per_minute: Option<i64>,

    /// Tokens per minute the provider allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10_000_000_000_i64))]
    pub tokens_per_minute: Option<i64>,

    /// Requests each gateway replica may have in flight to this provider at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100_000))]
    pub max_concurrent: Option<i32>,
}

/// Health checking of a provider.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct HealthCheck {
    /// Passive checking: judge the provider by the outcome of real requests.
    #[serde(default)]
    pub passive: PassiveHealth,

    /// Active probing: send a cheap request on a timer. Off unless set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<ActiveProbe>,

    /// Recovery checks: while the provider, or one of its models, is out of rotation
    /// after failures (an open circuit breaker, an ejection), each gateway replica checks
    /// it on a growing interval and puts it back as soon as a check passes, so a
    /// recovered provider serves again within `maxInterval` and no client request is
    /// spent on finding out. A failing check keeps it out until the next one. Rests asked
    /// for with a 429 end at the time the provider gave, without checks.
    #[serde(default)]
    pub recovery: RecoveryCheck,
}

/// How a provider out of rotation is checked for recovery.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!self.initialInterval.matches('^([0-9]+(\\\\.[0-9]+)?(ms|s|m|h))+$') || !self.maxInterval.matches('^([0-9]+(\\\\.[0-9]+)?(ms|s|m|h))+$') || (duration(self.initialInterval) <= duration(self.maxInterval))").message("recovery initialInterval must not exceed maxInterval"))]
pub struct RecoveryCheck {
    /// What a check of a model sends. `completion` (the default): a chat completion of
    /// one token to the model, the only check that proves the model answers again, at
    /// the cost of one token per check. `modelList`: the provider's model list, free but
    /// proof only that the endpoint answers. `none`: no checks; the breaker's `openFor`
    /// and the ejection time decide, and a real request is the first to try again. A
    /// provider whose connections fail is checked with its model list (unless `none`);
    /// a pattern route's models, whose names clients choose, are too.
    #[serde(default)]
    pub request: RecoveryRequest,

    /// The wait before the first check; each failed check doubles it, up to
    /// `maxInterval`.
    #[serde(default = "default_recovery_initial")]
    pub initial_interval: Duration,

    /// The longest wait between two checks, and so about the longest a recovered
    /// provider stays out of rotation.
    #[serde(default = "default_recovery_max")]
    pub max_interval: Duration,

    /// How long a check may take before it counts as failed.
    #[serde(default = "default_recovery_timeout")]
    pub timeout: Duration,
}

/// The request a recovery check sends.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum RecoveryRequest {
    /// A one-token chat completion to the model out of rotation.
    #[default]
    Completion,
    /// The provider's model list.
    ModelList,
    /// No recovery checks.
    None,
}

fn default_recovery_initial() -> Duration {
    Duration::from_millis(250)
}
fn default_recovery_max() -> Duration {
    Duration::from_secs(4)
}
fn default_recovery_timeout() -> Duration {
    Duration::from_secs(3)
}

impl Default for RecoveryCheck {
    fn default() -> Self {
        Self {
            request: RecoveryRequest::default(),
            initial_interval: default_recovery_initial(),
            max_interval: default_recovery_max(),
            timeout: default_recovery_timeout(),
        }
    }
}

/// Ejection driven by real traffic.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!self.baseEjectionTime.matches('^([0-9]+(\\\\.[0-9]+)?(ms|s|m|h))+$') || !self.maxEjectionTime.matches('^([0-9]+(\\\\.[0-9]+)?(ms|s|m|h))+$') || (duration(self.baseEjectionTime) <= duration(self.maxEjectionTime))").message("baseEjectionTime must not exceed maxEjectionTime"))]
pub struct PassiveHealth {
    /// Consecutive failed requests (connect errors, timeouts, 5xx) that eject the provider.
    #[serde(default = "default_consecutive_failures")]
    #[schemars(range(min = 1, max = 1000))]
    pub consecutive_failures: i32,

    /// How long the first ejection lasts.
    #[serde(default = "default_base_ejection")]
    pub base_ejection_time: Duration,

    /// Each further ejection in a row lasts this many times longer than the previous one.
    #[serde(default = "default_ejection_growth")]
    #[schemars(range(min = 1.0, max = 10.0))]
    pub ejection_growth: f64,

    /// Upper bound of an ejection, however often the provider failed.
    #[serde(default = "default_max_ejection")]
    pub max_ejection_time: Duration,

    /// A response whose headers take longer than this counts as a failure towards
    /// ejection and the circuit breaker (its answer is still served), so a provider that
    /// became slow is avoided before it times out. Off unless set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_threshold: Option<Duration>,
}

fn default_consecutive_failures() -> i32 {
    5
}
fn default_base_ejection() -> Duration {
    Duration::from_secs(30)
}
fn default_ejection_growth() -> f64 {
    2.0
}
fn default_max_ejection() -> Duration {
    Duration::from_secs(300)
}

impl Default for PassiveHealth {
    fn default() -> Self {
        Self {
            consecutive_failures: default_consecutive_failures(),
            base_ejection_time: default_base_ejection(),
            ejection_growth: default_ejection_growth(),
            max_ejection_time: default_max_ejection(),
            slow_threshold: None,
        }
    }
}

/// A periodic probe of the provider.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!self.timeout.matches('^([0-9]+(\\\\.[0-9]+)?(ms|s|m|h))+$') || !self.interval.matches('^([0-9]+(\\\\.[0-9]+)?(ms|s|m|h))+$') || (duration(self.timeout) < duration(self.interval))").message("probe timeout must be shorter than its interval"))]
pub struct ActiveProbe {
    /// Time between probes.
    #[serde(default = "default_probe_interval")]
    pub interval: Duration,

    /// How long a probe may take before it counts as failed.
    #[serde(default = "default_probe_timeout")]
    pub timeout: Duration,

    /// Consecutive successful probes that mark an ejected provider healthy again.
    #[serde(default = "default_healthy_threshold")]
    #[schemars(range(min = 1, max = 100))]
    pub healthy_threshold: i32,

    /// Consecutive failed probes that eject the provider.
    #[serde(default = "default_unhealthy_threshold")]
    #[schemars(range(min = 1, max = 100))]
    pub unhealthy_threshold: i32,
}

fn default_probe_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_probe_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_healthy_threshold() -> i32 {
    2
}
fn default_unhealthy_threshold() -> i32 {
    3
}
