//! A log line when a provider, or one of its models, stops or starts being usable, once
//! per change: an operator reading the log sees an ejection, an opened breaker or a 429
//! rest begin and end without scraping metrics.

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
            let view = p.view(now);
            let out = p.unusable.or_else(|| {
                view.unavailable_for_ms
                    .map(|_| view.reason.unwrap_or("Unavailable"))
            });
            // A provider seen for the first time counts as having been usable, so one that
            // starts out of rotation (drained, without its key, already resting) says so.
            let before = last.insert(p.config.name.clone(), out).unwrap_or(None);
            log_change(&p.config.name, None, before, out, view.unavailable_for_ms);
            // A model out while its provider is out says nothing more.
            if out.is_some() {
                continue;
            }
            for m in &view.models {
                let out = m
                    .unavailable_for_ms
                    .map(|_| m.reason.unwrap_or("Unavailable"));
                let key = format!("{}\u{0}{}", p.config.name, m.model);
                let before = last.insert(key, out).unwrap_or(None);
                log_change(
                    &p.config.name,
                    Some(&m.model),
                    before,
                    out,
                    m.unavailable_for_ms,
                );
            }
        }
    }
}

fn log_change(
    provider: &str,
    model: Option<&str>,
    before: Option<&'static str>,
    now: Option<&'static str>,
    back_in_ms: Option<u64>,
) {
    match (before, now, model) {
        (None, Some(reason), None) => tracing::warn!(
            provider,
            reason,
            back_in_ms,
            "provider taken out of rotation"
        ),
        (None, Some(reason), Some(model)) => tracing::warn!(
            provider,
            model,
            reason,
            back_in_ms,
            "provider's model taken out of rotation"
        ),
        (Some(_), None, None) => tracing::warn!(provider, "provider back in rotation"),
        (Some(_), None, Some(model)) => {
            tracing::warn!(provider, model, "provider's model back in rotation")
        }
        _ => {}
    }
}
