//! Active probes: for providers whose `health.active` is set, a cheap request on a timer
//! (the model list, as each dialect addresses it), so a provider can be taken out before real traffic hits it and
//! brought back without risking real requests.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::dialect;
use crate::gateway::Gateway;

/// How often the prober checks which probes are due.
const TICK: Duration = Duration::from_millis(100);

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
            let Some(req) = dialect::probe_request(p.upstream()) else {
                continue;
            };
            let health = p.health.clone();
            let sent = gw.request(active.timeout.get(), req);
            let name = p.config.name.clone();
            let healthy = u32::try_from(active.healthy_threshold).unwrap_or(1);
            let unhealthy = u32::try_from(active.unhealthy_threshold).unwrap_or(1);
            tokio::spawn(async move {
                let ok = matches!(
                    tokio::time::timeout(active.timeout.get(), sent).await,
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
