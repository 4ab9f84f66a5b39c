//! A log line when a provider stops or starts being usable, once per change: an operator
//! reading the log sees an ejection, an opened breaker or a 429 rest begin and end without
//! scraping metrics.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::gateway::Gateway;

/// How often providers are looked at; a change shorter than this may go unlogged.
const EVERY: Duration = Duration::from_secs(1);

/// Watches the current table's providers until the process ends.
pub async fn run(gw: Arc<Gateway>) {
    // Provider name → the reason it is unusable, or `None` while usable.
    let mut last: HashMap<String, Option<&'static str>> = HashMap::new();
    loop {
        tokio::time::sleep(EVERY).await;
        let Some(table) = gw.table.load_full() else {
            continue;
        };
        let now = Instant::now();
        for p in table.providers() {
            let view = p.health.view(now);
            let out = p.unusable.or_else(|| {
                view.unavailable_for_ms
                    .map(|_| view.reason.unwrap_or("Unavailable"))
            });
            // A provider seen for the first time counts as having been usable, so one that
            // starts out of rotation (drained, without its key, already resting) says so.
            let before = last.insert(p.config.name.clone(), out).unwrap_or(None);
            match (before, out) {
                (None, Some(reason)) => tracing::warn!(
                    provider = %p.config.name,
                    reason,
                    back_in_ms = view.unavailable_for_ms,
                    "provider taken out of rotation"
                ),
                (Some(_), None) => tracing::warn!(
                    provider = %p.config.name,
                    "provider back in rotation"
                ),
                _ => {}
            }
        }
    }
}
