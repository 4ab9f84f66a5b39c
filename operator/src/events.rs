//! Events (events.k8s.io/v1) for condition transitions. An event that repeats within six
//! minutes is counted on the first one (its `series`), as kube-runtime's `Recorder` and
//! client-go do.
//!
//! Written here rather than taken from kube-runtime because of cost at scale: its
//! `Recorder` keeps a clone of every event it published in the last six minutes, keyed by
//! the object's reference including its resourceVersion (so a status write makes the next
//! event a new one anyway), and scans them all on every publish. A cold start over 1,000
//! pools published ~7,000 events, all held at once. This keeps a few dozen bytes per
//! recent event, at most [`REMEMBERED`] of them, swept once a minute.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event as K8sEvent, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType};
use kube::{Api, Client};
use serde_json::json;

/// How long an event can be continued by a repeat (client-go's and kube-runtime's value).
const SERIES_WINDOW: Duration = Duration::from_secs(6 * 60);
/// How many recent events are remembered for series; beyond it a repeat is a new event.
pub const REMEMBERED: usize = 4096;
/// How often forgotten events are swept out.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// The event a repeat continues.
#[derive(Debug)]
struct Recent {
    namespace: String,
    name: String,
    count: i32,
    last: Instant,
}

#[derive(Debug, Default)]
struct Memory {
    recent: HashMap<u64, Recent>,
    swept: Option<Instant>,
}

impl Memory {
    fn sweep(&mut self, now: Instant) {
        if self
            .swept
            .is_some_and(|at| now.duration_since(at) < SWEEP_EVERY)
        {
            return;
        }
        self.swept = Some(now);
        self.recent
            .retain(|_, r| now.duration_since(r.last) < SERIES_WINDOW);
    }
}

/// Publishes Events about the objects the operator reconciles.
pub struct Publisher {
    client: Client,
    controller: String,
    instance: String,
    memory: Mutex<Memory>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("controller", &self.controller)
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

/// What makes two events the same: the object (by uid, not by resourceVersion), type,
/// reason, action and note.
fn identity(ev: &Event, regarding: &ObjectReference) -> u64 {
    let mut h = DefaultHasher::new();
    (
        &regarding.uid,
        &regarding.kind,
        &regarding.namespace,
        &regarding.name,
    )
        .hash(&mut h);
    matches!(ev.type_, EventType::Warning).hash(&mut h);
    (&ev.reason, &ev.action, &ev.note).hash(&mut h);
    h.finish()
}

impl Publisher {
    /// Events reported by `controller` (the component) from `instance` (the pod).
    pub fn new(client: Client, controller: &str, instance: &str) -> Self {
        Self {
            client,
            controller: controller.to_owned(),
            instance: instance.to_owned(),
            memory: Mutex::default(),
        }
    }

    /// How many events are remembered for series now.
    pub fn remembered(&self) -> usize {
        self.lock().recent.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Memory> {
        self.memory.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Publishes `ev` about `regarding`: a new Event, or the next count of the same one
    /// published within six minutes.
    pub async fn publish(
        &self,
        ev: &Event,
        regarding: &ObjectReference,
    ) -> Result<(), kube::Error> {
        let key = identity(ev, regarding);
        let now = Instant::now();
        let repeat = {
            let mut memory = self.lock();
            memory.sweep(now);
            memory
                .recent
                .get(&key)
                .filter(|r| now.duration_since(r.last) < SERIES_WINDOW)
                .map(|r| (r.namespace.clone(), r.name.clone(), r.count + 1))
        };
        if let Some((ns, name, count)) = repeat {
            let series = EventSeries {
                count,
                last_observed_time: MicroTime(Timestamp::now()),
            };
            let events = Api::<K8sEvent>::namespaced(self.client.clone(), &ns);
            match events
                .patch(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({ "series": series })),
                )
                .await
            {
                Ok(_) => {
                    if let Some(r) = self.lock().recent.get_mut(&key) {
                        r.count = count;
                        r.last = now;
                    }
                    return Ok(());
                }
                // Expired from the API server (its event TTL) or deleted: start anew.
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        let event = self.event(ev, regarding);
        let ns = event.metadata.namespace.clone().unwrap_or_default();
        let name = event.metadata.name.clone().unwrap_or_default();
        Api::<K8sEvent>::namespaced(self.client.clone(), &ns)
            .create(&PostParams::default(), &event)
            .await?;
        let mut memory = self.lock();
        if memory.recent.len() < REMEMBERED || memory.recent.contains_key(&key) {
            memory.recent.insert(
                key,
                Recent {
                    namespace: ns,
                    name,
                    count: 1,
                    last: now,
                },
            );
        }
        Ok(())
    }

    fn event(&self, ev: &Event, regarding: &ObjectReference) -> K8sEvent {
        let now = Timestamp::now();
        let object = regarding.name.as_deref().unwrap_or(&self.controller);
        K8sEvent {
            metadata: ObjectMeta {
                // Unique per object and moment, as client-go names them.
                name: Some(format!("{object}.{:x}", now.as_nanosecond())),
                namespace: Some(
                    regarding
                        .namespace
                        .clone()
                        .unwrap_or_else(|| "default".to_owned()),
                ),
                ..ObjectMeta::default()
            },
            action: Some(ev.action.clone()),
            reason: Some(ev.reason.clone()),
            note: ev.note.clone(),
            type_: Some(
                match ev.type_ {
                    EventType::Normal => "Normal",
                    EventType::Warning => "Warning",
                }
                .to_owned(),
            ),
            event_time: Some(MicroTime(now)),
            regarding: Some(regarding.clone()),
            related: ev.secondary.clone(),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            ..K8sEvent::default()
        }
    }
}
