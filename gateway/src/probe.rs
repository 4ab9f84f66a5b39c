//! The gateway's own requests to its providers, on timers:
//!
//! - **active probes**, for providers whose `health.active` is set: a cheap request (the
//!   model list, as each dialect addresses it) every `interval`, so a provider can be
//!   taken out before real traffic hits it;
//! - **recovery checks** (`health.recovery`): while a provider's endpoint or one of its
//!   models is out of rotation after failures, a check after `initialInterval`, doubling
//!   up to `maxInterval` while checks fail. A passing check puts it back at once; a
//!   failing one keeps it out until the next check, so no client request is spent on
//!   finding out.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use crds::TargetConfig;
use crds::pool::{RecoveryCheck, RecoveryRequest};
use http_body_util::Full;
use hyper::Request;
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::body::RequestBody;
use crate::dialect::{self, Operation, build_request};
use crate::gateway::Gateway;
use crate::health::Health;
use crate::table::ProviderEntry;

/// How often the prober looks at what is due.
const TICK: Duration = Duration::from_millis(100);

/// What a recovery check is about: a provider's endpoint (`None`) or one of its models.
type CheckKey = (String, Option<String>);

/// A target out of rotation, being checked.
struct Checking {
    next: Instant,
    interval: Duration,
    running: bool,
}

/// Runs probes and recovery checks until the process ends.
pub async fn run(gw: Arc<Gateway>) {
    let mut due: HashMap<String, Instant> = HashMap::new();
    let mut checking: HashMap<CheckKey, Checking> = HashMap::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(CheckKey, bool)>();
    loop {
        tokio::time::sleep(TICK).await;
        let Some(table) = gw.table.load_full() else {
            continue;
        };
        let now = Instant::now();
        // Results first: a failed check waits longer before the next one.
        while let Ok((key, passed)) = done_rx.try_recv() {
            if passed {
                checking.remove(&key);
            } else if let Some(c) = checking.get_mut(&key) {
                let max = table.provider(&key.0).map_or(Duration::from_secs(4), |p| {
                    p.config.health.recovery.max_interval.get()
                });
                c.running = false;
                c.interval = (c.interval * 2).min(max);
                c.next = now + c.interval;
            }
        }
        let mut out: Vec<CheckKey> = Vec::new();
        for p in table.providers() {
            if p.unusable.is_some() {
                continue;
            }
            active_probe(&gw, p, &mut due, now);
            let recovery = &p.config.health.recovery;
            if recovery.request == RecoveryRequest::None {
                continue;
            }
            // An endpoint out takes its models with it: check the endpoint alone.
            if p.health.link.needs_recovery(now) {
                out.push((p.config.name.clone(), None));
                continue;
            }
            for m in p.models.iter().filter(|m| m.health.needs_recovery(now)) {
                out.push((p.config.name.clone(), Some(m.key.clone())));
            }
        }
        checking.retain(|key, _| out.contains(key));
        for key in out {
            let Some(p) = table.provider(&key.0) else {
                continue;
            };
            let recovery = &p.config.health.recovery;
            let c = checking.entry(key.clone()).or_insert_with(|| Checking {
                next: now + recovery.initial_interval.get(),
                interval: recovery.initial_interval.get(),
                running: false,
            });
            if c.running || c.next > now {
                continue;
            }
            let (health, check) = match &key.1 {
                None => (&p.health.link, None),
                Some(model) => {
                    let Some(slot) = p.models.iter().find(|m| &m.key == model) else {
                        continue;
                    };
                    (slot.health.as_ref(), slot.check.as_ref())
                }
            };
            // Whatever the check says, no real request goes there before its result.
            health.still_down(now, now + recovery.timeout.get() + TICK);
            let Some(req) = check_request(p, recovery, check) else {
                continue;
            };
            c.running = true;
            let health = match &key.1 {
                None => None,
                Some(model) => p
                    .models
                    .iter()
                    .find(|m| &m.key == model)
                    .map(|m| m.health.clone()),
            };
            let provider = p.health.clone();
            let sent = gw.request(recovery.timeout.get(), req);
            let (timeout, max) = (recovery.timeout.get(), recovery.max_interval.get());
            let done = done_tx.clone();
            let gw = gw.clone();
            tokio::spawn(async move {
                let passed = match tokio::time::timeout(timeout, sent).await {
                    // The endpoint answered: it is reachable, whatever it said.
                    Ok(Ok(_)) if key.1.is_none() => true,
                    // The model answered without a server error or a rest: a 4xx says the
                    // check's request was not to its taste, not that it is down.
                    Ok(Ok(resp)) => {
                        let status = resp.status();
                        !status.is_server_error() && status.as_u16() != 429
                    }
                    _ => false,
                };
                let now = Instant::now();
                let level: &Health = health.as_deref().unwrap_or(&provider.link);
                if passed {
                    level.recovered(now);
                } else {
                    // Out until the next check has had its time, at the longest interval.
                    level.still_down(now, now + max + timeout + TICK);
                }
                gw.metrics.recovery_check(&key.0, passed);
                tracing::debug!(
                    provider = %key.0,
                    model = key.1.as_deref().unwrap_or(""),
                    passed,
                    "recovery check"
                );
                let _ = done.send((key, passed));
            });
        }
    }
}

/// The request that checks a provider (`check` is `None`) or one of its models.
fn check_request(
    p: &ProviderEntry,
    recovery: &RecoveryCheck,
    check: Option<&TargetConfig>,
) -> Option<Request<Full<Bytes>>> {
    match check {
        Some(target) if recovery.request == RecoveryRequest::Completion => {
            let body = RequestBody::from_value(&json!({
                "model": target.upstream_model,
                "messages": [{"role": "user", "content": "ping"}],
                "max_tokens": 1,
            }))
            .ok()?;
            build_request(
                p.upstream(),
                target,
                Operation::ChatCompletions,
                &body,
                "switchyard-recovery-check",
            )
            .ok()
        }
        _ => dialect::probe_request(p.upstream()),
    }
}

/// Sends `p`'s active probe when it is due.
fn active_probe(
    gw: &Arc<Gateway>,
    p: &ProviderEntry,
    due: &mut HashMap<String, Instant>,
    now: Instant,
) {
    let Some(active) = p.config.health.active.clone() else {
        return;
    };
    let next = due.entry(p.config.name.clone()).or_insert(now);
    if *next > now {
        return;
    }
    *next = now + active.interval.get();
    let Some(req) = dialect::probe_request(p.upstream()) else {
        return;
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
        health.link.record_probe(ok, healthy, unhealthy);
    });
}
