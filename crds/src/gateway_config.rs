//! The compiled, region-specific configuration of a gateway: the contract between the
//! operator (which writes it into a ConfigMap) and the gateway (which reads it).
//!
//! It is self-contained and explicit — every default applied, every reference resolved,
//! every target's tier computed for the region — so the gateway needs no Kubernetes
//! knowledge to route. It never holds a secret value, only Secret references.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::duration::Duration;
use crate::policy::{
    CircuitBreaker, ContentPolicyAction, RegionalMode, RetryPolicy, StaticResponse, Strategy,
    Timeouts,
};
use crate::pool::{AnthropicSettings, HealthCheck, Limits, ProviderType, SecretKeyRef};

/// Version of the GatewayConfig format; a gateway refuses a config of another version.
pub const GATEWAY_CONFIG_VERSION: u32 = 1;

/// The ConfigMap data key holding the JSON-encoded GatewayConfig.
pub const GATEWAY_CONFIG_KEY: &str = "gateway.json";

/// The ConfigMap binaryData key holding it gzip-compressed, when it is too large to keep
/// readable (see [`encode`]).
pub const GATEWAY_CONFIG_GZ_KEY: &str = "gateway.json.gz";

/// Largest configuration kept as readable JSON; larger ones are compressed, so the
/// largest configuration the schemas and [`crate::compile`]'s bounds allow stays well
/// inside a ConfigMap's 1 MiB.
pub const INLINE_CONFIG_MAX: usize = 256 << 10;

/// Largest encoded configuration the operator writes: a ConfigMap holds at most 1 MiB,
/// and its metadata needs some of that.
pub const CONFIG_MAP_DATA_MAX: usize = 900 << 10;

/// Largest configuration a gateway inflates.
const INFLATED_MAX: u64 = 64 << 20;

/// A configuration as stored in a ConfigMap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Encoded {
    /// Compact JSON under [`GATEWAY_CONFIG_KEY`] in `data`.
    Json(String),
    /// Gzip-compressed JSON under [`GATEWAY_CONFIG_GZ_KEY`] in `binaryData`.
    Gzip(Vec<u8>),
}

/// Encodes `config` for its ConfigMap: compact JSON, compressed beyond
/// [`INLINE_CONFIG_MAX`].
pub fn encode(config: &GatewayConfig) -> Encoded {
    let json = serde_json::to_string(config).unwrap_or_default();
    if json.len() <= INLINE_CONFIG_MAX {
        return Encoded::Json(json);
    }
    Encoded::Gzip(gzip(json.as_bytes()))
}

/// Whether `config`, encoded, takes at most `max` bytes; compresses only when its JSON
/// alone would not fit.
pub fn fits(config: &GatewayConfig, max: usize) -> bool {
    let json = serde_json::to_string(config).unwrap_or_default();
    json.len() <= max || gzip(json.as_bytes()).len() <= max
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    // Writing into a Vec cannot fail.
    let _ = gz.write_all(bytes);
    gz.finish().unwrap_or_default()
}

impl Encoded {
    /// Bytes it takes in the ConfigMap.
    pub fn len(&self) -> usize {
        match self {
            Self::Json(json) => json.len(),
            Self::Gzip(gz) => gz.len(),
        }
    }

    /// Whether it takes no bytes (never, for a real configuration).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Reads the configuration from a ConfigMap's `data` and `binaryData`, whichever holds it.
pub fn decode(
    data: Option<&BTreeMap<String, String>>,
    binary: Option<&BTreeMap<String, k8s_openapi::ByteString>>,
) -> Result<GatewayConfig, String> {
    use std::io::Read;
    if let Some(json) = data.and_then(|d| d.get(GATEWAY_CONFIG_KEY)) {
        return serde_json::from_str(json)
            .map_err(|e| format!("{GATEWAY_CONFIG_KEY} is invalid: {e}"));
    }
    let Some(gz) = binary.and_then(|b| b.get(GATEWAY_CONFIG_GZ_KEY)) else {
        return Err(format!(
            "the ConfigMap has neither {GATEWAY_CONFIG_KEY} nor {GATEWAY_CONFIG_GZ_KEY}"
        ));
    };
    let mut json = Vec::new();
    flate2::read::GzDecoder::new(&gz.0[..])
        .take(INFLATED_MAX + 1)
        .read_to_end(&mut json)
        .map_err(|e| format!("{GATEWAY_CONFIG_GZ_KEY} is not valid gzip: {e}"))?;
    if json.len() as u64 > INFLATED_MAX {
        return Err(format!(
            "{GATEWAY_CONFIG_GZ_KEY} inflates past {INFLATED_MAX} bytes"
        ));
    }
    serde_json::from_slice(&json).map_err(|e| format!("{GATEWAY_CONFIG_GZ_KEY} is invalid: {e}"))
}

/// Everything one region's gateways need to route.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GatewayConfig {
    /// Format version, [`GATEWAY_CONFIG_VERSION`].
    pub version: u32,
    /// Namespace of the pool; Secrets are read from it.
    pub namespace: String,
    /// Name of the ProviderPool.
    pub pool: String,
    /// The region these gateways run in.
    pub region: String,
    /// Providers, local ones first, then by name.
    pub providers: Vec<ProviderConfig>,
    /// Routes, exact model names first (by name), then patterns (longest prefix first).
    pub routes: Vec<RouteConfig>,
}

/// A provider as the gateway sees it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProviderConfig {
    /// The provider's name in the pool; also the key its health is tracked under.
    pub name: String,
    /// Wire format.
    #[serde(rename = "type")]
    pub provider_type: ProviderType,
    /// Base URL.
    pub endpoint: String,
    /// Region the provider lives in.
    pub region: String,
    /// Whether the provider lives in the gateway's region.
    pub local: bool,
    /// False while the provider is drained.
    pub enabled: bool,
    /// Where the API key lives; `None` for keyless servers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<SecretKeyRef>,
    /// Azure `api-version`, for `azureOpenAI`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azure_api_version: Option<String>,
    /// Anthropic settings, for `anthropic`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anthropic: Option<AnthropicSettings>,
    /// Account limits.
    pub limits: Limits,
    /// Health checking.
    pub health: HealthCheck,
}

/// A compiled route.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RouteConfig {
    /// Exact public model name, or a pattern ending in `*`.
    pub model: String,
    /// The RoutingPolicy this route came from.
    pub policy: String,
    /// Selection strategy within a tier.
    pub strategy: Strategy,
    /// Regional mode the tiers were computed with.
    pub regional: RegionalMode,
    /// Targets in ascending tier order, then by provider name.
    pub targets: Vec<TargetConfig>,
    /// Exact model names of other routes to try when every target failed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallbacks: Vec<String>,
    /// Exact model name of the route a too-long request goes to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_context_length_exceeded: Option<String>,
    /// Reaction to a content-policy refusal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_content_policy: Option<ContentPolicyAction>,
    /// Retries.
    pub retry: RetryPolicy,
    /// Time limits.
    pub timeouts: Timeouts,
    /// Circuit breaker settings.
    pub circuit_breaker: CircuitBreaker,
    /// Answer when nothing can serve.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degraded_response: Option<StaticResponse>,
    /// Secret holding the client API keys accepted for this route; `None` means open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_auth_secret: Option<String>,
    /// Models particular clients are limited to (exact names or `*` patterns), by client
    /// name; clients not listed may use every model.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub client_models: BTreeMap<String, Vec<String>>,
    /// How long answers to requests carrying an `Idempotency-Key` are replayed; zero
    /// turns replay off.
    #[serde(default = "no_idempotency")]
    pub idempotency_window: Duration,
}

fn no_idempotency() -> Duration {
    Duration::from_secs(0)
}

impl RouteConfig {
    /// Whether `client` may ask for `model` on this route.
    pub fn allows(&self, client: &str, model: &str) -> bool {
        self.client_models.get(client).is_none_or(|allowed| {
            allowed.iter().any(|a| match a.strip_suffix('*') {
                Some(prefix) => model.starts_with(prefix),
                None => a == model,
            })
        })
    }
}

/// A provider that can serve a route.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TargetConfig {
    /// Provider name, a key into [`GatewayConfig::providers`].
    pub provider: String,
    /// Model name sent upstream; `None` passes the name the client asked for (pattern
    /// routes only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_model: Option<String>,
    /// Azure deployment, for `azureOpenAI`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<String>,
    /// Context window in tokens, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_window: Option<i64>,
    /// Whether it was declared unable to continue a partial answer (`continuation:
    /// none`); unset, the provider's type decides.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_continuation: bool,
    /// Relative share of traffic within the tier.
    pub weight: u32,
    /// The priority the user gave.
    pub priority: u32,
    /// Selection order: a higher tier serves only while no target of a lower one is
    /// usable. `2 * priority`, plus one for a remote provider under `preferLocal`.
    pub tier: u32,
}

impl GatewayConfig {
    /// Names of every Secret the config refers to (provider credentials, client keys).
    pub fn referenced_secrets(&self) -> BTreeSet<String> {
        let providers = self
            .providers
            .iter()
            .filter_map(|p| p.credentials.as_ref())
            .map(|c| c.name.clone());
        let clients = self
            .routes
            .iter()
            .filter_map(|r| r.client_auth_secret.clone());
        providers.chain(clients).collect()
    }

    /// The route serving `model`: an exact match, else the longest matching pattern.
    pub fn route_for(&self, model: &str) -> Option<&RouteConfig> {
        self.routes.iter().find(|r| r.model == model).or_else(|| {
            self.routes
                .iter()
                .filter_map(|r| r.model.strip_suffix('*').map(|prefix| (prefix, r)))
                .filter(|(prefix, _)| model.starts_with(prefix))
                .max_by_key(|(prefix, _)| prefix.len())
                .map(|(_, r)| r)
        })
    }

    /// The provider called `name`.
    pub fn provider(&self, name: &str) -> Option<&ProviderConfig> {
        self.providers.iter().find(|p| p.name == name)
    }
}
