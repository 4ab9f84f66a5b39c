//! Configuration sources. Standalone: ProviderPool, RoutingPolicy and Secret manifests
//! from a file or directory, compiled with the operator's `compile` and reloaded when
//! they change. A bad update keeps the last good table and is reported.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crds::GatewayConfig;
use tokio::time::Instant;

use crate::gateway::Gateway;
use crate::table::{RoutingTable, Secrets};

/// How often the manifests are checked for changes.
const POLL: Duration = Duration::from_millis(500);

/// Manifests on disk.
#[derive(Debug, Clone)]
pub struct ManifestSource {
    /// File or directory.
    pub path: PathBuf,
    /// The region this gateway serves.
    pub region: String,
    /// Namespace for manifests that name none.
    pub namespace: String,
    /// Which pool to serve when the manifests hold several.
    pub pool: Option<String>,
}

impl ManifestSource {
    /// Reads and compiles the manifests.
    pub fn load(&self) -> Result<(GatewayConfig, Secrets, Vec<String>, usize), String> {
        let manifests =
            crds::manifests::load(&self.path, &self.namespace).map_err(|e| e.to_string())?;
        let pool = match &self.pool {
            Some(name) => manifests
                .pools
                .iter()
                .find(|p| p.metadata.name.as_deref() == Some(name.as_str())),
            None if manifests.pools.len() == 1 => manifests.pools.first(),
            None => {
                return Err(format!(
                    "{} holds {} ProviderPools; choose one with --pool",
                    self.path.display(),
                    manifests.pools.len()
                ));
            }
        }
        .ok_or_else(|| {
            format!(
                "no ProviderPool {} in {}",
                self.pool.as_deref().unwrap_or(""),
                self.path.display()
            )
        })?;
        let compiled =
            crds::compile(pool, &manifests.policies, &self.region).map_err(|e| e.to_string())?;
        let mut warnings = Vec::new();
        for rejection in &compiled.rejected {
            for error in &rejection.errors {
                warnings.push(format!(
                    "RoutingPolicy {} rejected: {error}",
                    rejection.policy
                ));
            }
        }
        for conflict in &compiled.conflicts {
            warnings.push(format!(
                "RoutingPolicy {} does not serve {:?}: the older RoutingPolicy {} claims it",
                conflict.loser, conflict.model, conflict.winner
            ));
        }
        let mut secrets = Secrets::default();
        for secret in manifests.secrets {
            let mut data = std::collections::BTreeMap::new();
            for (k, v) in secret.data.unwrap_or_default() {
                data.insert(k, String::from_utf8_lossy(&v.0).into_owned());
            }
            for (k, v) in secret.string_data.unwrap_or_default() {
                data.insert(k, v);
            }
            secrets.insert(secret.metadata.name.unwrap_or_default(), data);
        }
        Ok((compiled.config, secrets, warnings, compiled.rejected.len()))
    }

    fn fingerprint(&self) -> Vec<(PathBuf, Option<SystemTime>, u64)> {
        crds::manifests::files(&self.path)
            .unwrap_or_default()
            .into_iter()
            .map(|f| {
                let meta = std::fs::metadata(&f).ok();
                (
                    f,
                    meta.as_ref().and_then(|m| m.modified().ok()),
                    meta.map_or(0, |m| m.len()),
                )
            })
            .collect()
    }

    /// Loads and installs the manifests. At start-up a policy that does not compile is
    /// left out with a warning; later, an update that would drop a policy is refused as a
    /// whole, so a typo never takes routes away from a running gateway.
    pub fn apply(&self, gateway: &Gateway) -> Result<(), String> {
        match self.load() {
            Ok((_, _, warnings, rejected)) if rejected > 0 && gateway.table.load().is_some() => {
                let e = warnings.join("; ");
                gateway.config_failed(&e);
                Err(e)
            }
            Ok((config, secrets, warnings, _)) => {
                for w in &warnings {
                    tracing::warn!(warning = %w, "configuration");
                }
                let previous = gateway.table.load_full();
                let table =
                    RoutingTable::build(config, &secrets, previous.as_deref(), Instant::now());
                let routes = table.routes().len();
                let providers = table.providers().count();
                gateway.install(table, warnings);
                tracing::info!(routes, providers, source = %self.path.display(), "configuration loaded");
                Ok(())
            }
            Err(e) => {
                gateway.config_failed(&e);
                Err(e)
            }
        }
    }

    /// Reloads whenever a manifest changes; runs until the process ends.
    pub async fn watch(self, gateway: Arc<Gateway>) {
        let mut seen = self.fingerprint();
        loop {
            tokio::time::sleep(POLL).await;
            let now = self.fingerprint();
            if now == seen {
                continue;
            }
            seen = now;
            if let Err(e) = self.apply(&gateway) {
                tracing::error!(error = %e, "configuration update rejected; keeping the last good configuration");
            }
        }
    }
}
