//! Active probes: for providers whose `health.active` is set, a cheap request on a timer
//! (the model list), so a provider can be taken out before real traffic hits it and
//! brought back without risking real requests.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use crds::pool::ProviderType;
use http_body_util::Full;
use hyper::{Method, Request};
use tokio::time::Instant;

use crate::gateway::Gateway;
use crate::table::ProviderEntry;

/// How often the prober checks which probes are due.
const TICK: Duration = Duration::from_millis(100);

/// The model list, addressed and authenticated the way the provider's dialect wants.
fn probe_request(p: &ProviderEntry) -> Option<Request<Full<Bytes>>> {
    let endpoint = p.config.endpoint.trim_end_matches('/');
    let mut builder = Request::builder().method(Method::GET);
    builder = match p.config.provider_type {
        ProviderType::OpenAi | ProviderType::OpenAiCompatible => {
            let b = builder.uri(format!("{endpoint}/v1/models"));
            match &p.api_key {
                Some(k) => b.header("authorization", format!("Bearer {}", k.0)),
                None => b,
            }
        }
        ProviderType::AzureOpenAi => {
            let version = p
                .config
                .azure_api_version
                .as_deref()
                .unwrap_or("2024-10-21");
            let b = builder.uri(format!("{endpoint}/openai/models?api-version={version}"));
            match &p.api_key {
                Some(k) => b.header("api-key", k.0.clone()),
                None => b,
            }
        }
        ProviderType::Anthropic => {
            let version = p
                .config
                .anthropic
                .as_ref()
                .map_or("2023-06-01", |a| a.version.as_str());
            let b = builder
                .uri(format!("{endpoint}/v1/models"))
                .header("anthropic-version", version);
            match &p.api_key {
                Some(k) => b.header("x-api-key", k.0.clone()),
                None => b,
            }
        }
    };
    builder.body(Full::new(Bytes::new())).ok()
}

/// Runs probes until the process ends.
pub async fn run(gw: Arc<Gateway>) {
    let mut due: HashMap<String, Instant> = HashMap::new();
    loop {
        tokio::time::sleep(TICK).await;
        let Some(table) = gw.table.load_full() else {
            continue;
        };
        let now = Instant::now();
        for p in table.providers() {
            let Some(active) = p.config.health.active.clone() else {
                continue;
            };
            if p.unusable.is_some() {
                continue;
            }
            let next = due.entry(p.config.name.clone()).or_insert(now);
            if *next > now {
                continue;
            }
            *next = now + active.interval.get();
            let Some(req) = probe_request(p) else {
                continue;
            };
            let health = p.health.clone();
            let client = gw.client(active.timeout.get());
            let name = p.config.name.clone();
            let healthy = u32::try_from(active.healthy_threshold).unwrap_or(1);
            let unhealthy = u32::try_from(active.unhealthy_threshold).unwrap_or(1);
            tokio::spawn(async move {
                let ok = matches!(
                    tokio::time::timeout(active.timeout.get(), client.request(req)).await,
                    Ok(Ok(resp)) if resp.status().is_success()
                );
                if !ok {
                    tracing::debug!(provider = %name, "active probe failed");
                }
                health.record_probe(ok, healthy, unhealthy);
            });
        }
    }
}
