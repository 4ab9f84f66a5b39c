//! In a cluster: the operator's ConfigMap for this region is the source of truth, read
//! through the API (no restart, no volume-sync delay), with the Secrets it references;
//! and the gateway publishes what it learns about provider health into its pool's status.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use crds::status::HealthState;
use crds::{GATEWAY_CONFIG_VERSION, GatewayConfig, ProviderPool};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::gateway::Gateway;
use crate::table::{RoutingTable, Secrets};

/// Least time between two health publications of one replica.
const PUBLISH_EVERY: Duration = Duration::from_secs(3);

/// The region's ConfigMap.
#[derive(Clone)]
pub struct ClusterSource {
    /// API client.
    pub client: Client,
    /// Namespace of the pool.
    pub namespace: String,
    /// ConfigMap name.
    pub config_map: String,
}

impl std::fmt::Debug for ClusterSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterSource")
            .field("namespace", &self.namespace)
            .field("config_map", &self.config_map)
            .finish()
    }
}

fn parse(cm: &ConfigMap) -> Result<GatewayConfig, String> {
    let config = crds::decode_config(cm.data.as_ref(), cm.binary_data.as_ref())?;
    if config.version != GATEWAY_CONFIG_VERSION {
        return Err(format!(
            "the configuration has format version {}, this gateway reads version {GATEWAY_CONFIG_VERSION}",
            config.version
        ));
    }
    Ok(config)
}

fn secret_data(s: &Secret) -> BTreeMap<String, String> {
    s.data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), String::from_utf8_lossy(&v.0).into_owned()))
        .collect()
}

async fn read_secrets(api: &Api<Secret>, config: &GatewayConfig) -> Secrets {
    let mut secrets = Secrets::default();
    for name in config.referenced_secrets() {
        match api.get_opt(&name).await {
            Ok(Some(s)) => secrets.insert(name, secret_data(&s)),
            Ok(None) => tracing::warn!(secret = %name, "a referenced Secret does not exist"),
            Err(e) => tracing::warn!(secret = %name, error = %e, "cannot read a referenced Secret"),
        }
    }
    secrets
}

/// A change to a watched Secret: its name and entries, `None` once it is deleted.
type SecretChange = (String, Option<BTreeMap<String, String>>);

/// Watches one Secret by name (the gateway's Role grants only the names its config
/// references), so a rotated key applies as soon as the API server has it.
async fn watch_secret(api: Api<Secret>, name: String, changes: mpsc::Sender<SecretChange>) {
    let wc = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher::watcher(api, wc).default_backoff().boxed();
    while let Some(event) = events.next().await {
        let change = match event {
            Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) => Some(secret_data(&s)),
            Ok(watcher::Event::Delete(_)) => None,
            Ok(_) => continue,
            Err(e) => {
                tracing::warn!(secret = %name, error = %e, "watching a referenced Secret");
                continue;
            }
        };
        if changes.send((name.clone(), change)).await.is_err() {
            return;
        }
    }
}

/// One watch per Secret the configuration references, started and stopped as it changes.
#[derive(Default)]
struct SecretWatches {
    running: HashMap<String, tokio::task::JoinHandle<()>>,
}

impl SecretWatches {
    fn follow(
        &mut self,
        api: &Api<Secret>,
        config: &GatewayConfig,
        changes: &mpsc::Sender<SecretChange>,
    ) {
        let wanted: BTreeSet<String> = config.referenced_secrets().into_iter().collect();
        self.running.retain(|name, task| {
            let keep = wanted.contains(name);
            if !keep {
                task.abort();
            }
            keep
        });
        for name in wanted {
            self.running
                .entry(name.clone())
                .or_insert_with(|| tokio::spawn(watch_secret(api.clone(), name, changes.clone())));
        }
    }
}

impl Drop for SecretWatches {
    fn drop(&mut self) {
        for task in self.running.values() {
            task.abort();
        }
    }
}

impl ClusterSource {
    /// Watches the ConfigMap and the Secrets it references; installs each good config and
    /// keeps the last good one when an update is bad.
    pub async fn run(self, gw: Arc<Gateway>) {
        let cms: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.namespace);
        let secrets_api: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        let wc = watcher::Config::default().fields(&format!("metadata.name={}", self.config_map));
        let mut events = watcher::watcher(cms, wc).default_backoff().boxed();
        let mut current: Option<GatewayConfig> = None;
        let mut current_secrets = Secrets::default();
        let (changes_tx, mut changes) = mpsc::channel::<SecretChange>(16);
        let mut watches = SecretWatches::default();
        loop {
            tokio::select! {
                event = events.next() => {
                    let Some(event) = event else { return };
                    let cm = match event {
                        Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm)) => cm,
                        Ok(watcher::Event::Delete(_)) => {
                            tracing::warn!(config_map = %self.config_map, "the ConfigMap was deleted; keeping the last good configuration");
                            continue;
                        }
                        Ok(_) => continue,
                        Err(e) => {
                            tracing::warn!(error = %e, "watching the ConfigMap");
                            continue;
                        }
                    };
                    match parse(&cm) {
                        Ok(config) => {
                            // Read once so the new configuration starts with its keys;
                            // the watches keep them current from then on.
                            let secrets = read_secrets(&secrets_api, &config).await;
                            install(&gw, config.clone(), &secrets);
                            watches.follow(&secrets_api, &config, &changes_tx);
                            current = Some(config);
                            current_secrets = secrets;
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "configuration update rejected; keeping the last good configuration");
                            gw.config_failed(&e);
                        }
                    }
                }
                Some((name, data)) = changes.recv() => {
                    let Some(config) = &current else { continue };
                    let mut secrets = current_secrets.clone();
                    match data {
                        Some(data) => secrets.insert(name, data),
                        None => secrets.remove(&name),
                    }
                    if secrets != current_secrets {
                        tracing::info!("a referenced Secret changed; reloading");
                        install(&gw, config.clone(), &secrets);
                        current_secrets = secrets;
                    }
                }
            }
        }
    }
}

fn install(gw: &Gateway, config: GatewayConfig, secrets: &Secrets) {
    let previous = gw.table.load_full();
    let table = RoutingTable::build(config, secrets, previous.as_deref(), Instant::now());
    tracing::info!(
        routes = table.routes().len(),
        "configuration loaded from the cluster"
    );
    gw.install(table, Vec::new());
}

/// Publishes this region's view of provider health into the pool's status, with
/// server-side apply under a field manager of its own, only when something changed.
pub async fn publish_health(client: Client, gw: Arc<Gateway>) {
    let mut last: Option<serde_json::Value> = None;
    let mut since: HashMap<String, (HealthState, String)> = HashMap::new();
    loop {
        tokio::time::sleep(PUBLISH_EVERY).await;
        let Some(table) = gw.table.load_full() else {
            continue;
        };
        let now = Instant::now();
        let stamp = k8s_openapi::jiff::Timestamp::now().to_string();
        let providers: Vec<serde_json::Value> = table
            .providers()
            .filter(|p| p.config.enabled)
            .map(|p| {
                let view = p.view(now);
                let (state, reason) = match (p.unusable, view.state) {
                    (Some(reason), _) => (HealthState::Ejected, Some(reason)),
                    (None, "ejected") => (HealthState::Ejected, view.reason),
                    (None, "degraded") => (HealthState::Degraded, view.reason),
                    // Probes speak for a provider that no request has reached yet.
                    (None, _) if view.latency_ms.is_none() && view.last_probe_ok == Some(true) => {
                        (HealthState::Healthy, Some("ProbeSucceeded"))
                    }
                    (None, _) if view.latency_ms.is_none() => {
                        (HealthState::Unknown, Some("NoTrafficYet"))
                    }
                    (None, _) => (HealthState::Healthy, None),
                };
                let entry = since
                    .entry(p.config.name.clone())
                    .or_insert_with(|| (state, stamp.clone()));
                if entry.0 != state {
                    *entry = (state, stamp.clone());
                }
                json!({
                    "name": p.config.name,
                    "state": state,
                    "reason": reason,
                    "errorRate": format!("{:.2}", view.error_rate),
                    "latencyMs": view.latency_ms.map(|l| l.round() as i64),
                    "lastTransitionTime": entry.1,
                })
            })
            .collect();
        let body = json!({
            "apiVersion": "switchyard.dev/v1alpha1",
            "kind": "ProviderPool",
            "status": {"regions": [{"name": table.config.region, "providers": providers}]},
        });
        // Latency moves constantly; publish it only along with a state or error-rate change.
        let key = json!(
            providers
                .iter()
                .map(|p| (
                    p["name"].clone(),
                    p["state"].clone(),
                    p["errorRate"].clone()
                ))
                .collect::<Vec<_>>()
        );
        if last.as_ref() == Some(&key) {
            continue;
        }
        let api: Api<ProviderPool> = Api::namespaced(client.clone(), &table.config.namespace);
        let manager = format!("switchyard-gateway-{}", table.config.region);
        match api
            .patch_status(
                &table.config.pool,
                &PatchParams::apply(&manager).force(),
                &Patch::Apply(&body),
            )
            .await
        {
            Ok(_) => last = Some(key),
            Err(e) => {
                tracing::warn!(error = %e, "publishing provider health into the pool status failed")
            }
        }
    }
}
