//! Status math for both kinds, kept pure: observed facts in, the status the operator
//! owns out, its conditions built by `conditions::merge`.

use std::collections::BTreeSet;

use crds::k8s::{Condition, Time};
use crds::status::{HealthState, ProviderPoolStatus, RoutingPolicyStatus, conditions as types};
use crds::{PolicyError, PolicyErrorKind, ProviderPool, RoutingPolicy};
use serde_json::{Value, json};

use crate::conditions::{Desired, merge};

/// What the operator observed about one region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionObservation {
    /// Region name.
    pub name: String,
    /// Replicas asked for.
    pub desired: i32,
    /// Replicas ready.
    pub ready: i32,
    /// Revision of the config written for it.
    pub revision: String,
    /// Models its gateways route.
    pub routes: usize,
    /// Why its missing replicas cannot start, when its pods say so.
    pub stuck: Option<Stuck>,
}

/// Why a region's gateway pods do not become ready, from the pods themselves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stuck {
    /// The `Ready` reason: `PodsUnschedulable` or `PodsNotStarting`.
    pub reason: &'static str,
    /// The scheduler's or kubelet's own words.
    pub message: String,
}

/// Why a pool cannot reach its desired state, for its `Ready` condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The condition's reason: `InvalidConfiguration`, `NameConflict`, `ChildRejected`.
    pub reason: &'static str,
    /// What a user reads, naming the field or the object.
    pub message: String,
}

/// The ProviderPool status fields the operator owns, as the JSON it applies: from what
/// its regions show and what blocks it, if anything.
pub fn pool_status(
    pool: &ProviderPool,
    regions: &[RegionObservation],
    problem: Option<&Problem>,
    missing_credentials: &[String],
    now: &Time,
) -> Value {
    let existing = pool.status.clone().unwrap_or_default();
    let ready_regions = regions.iter().filter(|r| r.ready >= r.desired).count();
    let all_ready = problem.is_none() && ready_regions == regions.len();
    let rolling: Vec<&str> = regions
        .iter()
        .filter(|r| r.ready < r.desired)
        .map(|r| r.name.as_str())
        .collect();
    let (enabled, healthy, ejected) = provider_summary(pool, &existing);

    let mut desired = vec![
        Desired {
            type_: types::READY,
            status: all_ready,
            reason: if let Some(p) = problem {
                p.reason
            } else if all_ready {
                "AllRegionsReady"
            } else if let Some(stuck) = regions.iter().find_map(|r| r.stuck.as_ref()) {
                stuck.reason
            } else {
                "RegionsNotReady"
            },
            message: match problem {
                Some(p) => p.message.clone(),
                None if regions.iter().any(|r| r.stuck.is_some()) => regions
                    .iter()
                    .filter(|r| r.ready < r.desired)
                    .map(|r| match &r.stuck {
                        Some(stuck) => format!(
                            "region {} has {}/{} gateway replicas ready: {}",
                            r.name, r.ready, r.desired, stuck.message
                        ),
                        None => format!("waiting for gateway replicas in {}", r.name),
                    })
                    .collect::<Vec<_>>()
                    .join("; "),
                None if all_ready && regions.iter().all(|r| r.routes == 0) => format!(
                    "gateways ready in all {} regions, but no RoutingPolicy routes a model to this pool, so they answer every request with 404",
                    regions.len()
                ),
                None if all_ready => format!("gateways ready in all {} regions", regions.len()),
                None => format!("waiting for gateway replicas in {}", rolling.join(", ")),
            },
        },
        Desired {
            type_: types::PROGRESSING,
            status: !rolling.is_empty(),
            reason: if rolling.is_empty() {
                "RolloutComplete"
            } else {
                "RollingOut"
            },
            message: if rolling.is_empty() {
                "every region runs its desired replicas".to_owned()
            } else {
                format!("rolling out in {}", rolling.join(", "))
            },
        },
    ];
    // A provider without its key fails every request sent to it: as degrading as an
    // ejection, and said first because only the user can fix it.
    let (degraded, reason, message) = if !missing_credentials.is_empty() {
        (true, "SecretNotFound", missing_credentials.join("; "))
    } else if !ejected.is_empty() {
        (
            true,
            "ProvidersEjected",
            format!("ejected by gateways: {}", ejected.join(", ")),
        )
    } else {
        (false, "AsExpected", "no provider is ejected".to_owned())
    };
    desired.push(Desired {
        type_: types::DEGRADED,
        status: degraded,
        reason,
        message,
    });
    let conditions: Vec<Condition> =
        merge(&existing.conditions, desired, pool.metadata.generation, now);
    json!({
        "observedGeneration": pool.metadata.generation,
        "conditions": conditions,
        "readyRegions": format!("{ready_regions}/{}", regions.len()),
        "healthyProviders": match pool.spec.providers.iter().filter(|p| !p.enabled).count() {
            0 => format!("{healthy}/{enabled}"),
            drained => format!("{healthy}/{enabled}, {drained} drained"),
        },
        "regions": regions.iter().map(|r| json!({
            "name": r.name,
            "desiredReplicas": r.desired,
            "readyReplicas": r.ready,
            "configRevision": r.revision,
        })).collect::<Vec<_>>(),
    })
}

/// (enabled providers, healthy in at least one region, ejected somewhere as `region/name`).
fn provider_summary(
    pool: &ProviderPool,
    status: &ProviderPoolStatus,
) -> (usize, usize, Vec<String>) {
    let enabled: Vec<&str> = pool
        .spec
        .providers
        .iter()
        .filter(|p| p.enabled)
        .map(|p| p.name.as_str())
        .collect();
    let healthy = enabled
        .iter()
        .filter(|name| {
            status.regions.iter().flat_map(|r| &r.providers).any(|p| {
                &p.name == *name && matches!(p.state, HealthState::Healthy | HealthState::Degraded)
            })
        })
        .count();
    let ejected = status
        .regions
        .iter()
        .flat_map(|r| r.providers.iter().map(move |p| (r, p)))
        .filter(|(_, p)| p.state == HealthState::Ejected && enabled.contains(&p.name.as_str()))
        .map(|(r, p)| format!("{}/{}", r.name, p.name))
        .collect();
    (enabled.len(), healthy, ejected)
}

/// What the operator observed about a RoutingPolicy.
#[derive(Debug, Clone, PartialEq)]
pub enum PolicyFacts {
    /// Its pool does not exist.
    PoolMissing {
        /// The policy's namespace.
        namespace: String,
    },
    /// It was compiled against its pool.
    Compiled(PolicyCompiled),
}

/// What compiling a policy against its pool, in every region, showed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PolicyCompiled {
    /// Why it (this generation) was refused, in any region.
    pub errors: Vec<PolicyError>,
    /// Models an older policy keeps, each as the sentence that says so.
    pub conflicts: Vec<String>,
    /// Its models in the newly compiled configuration.
    pub compiled: BTreeSet<String>,
    /// Its models in the gateways' ConfigMaps now.
    pub in_cluster: BTreeSet<String>,
    /// Secrets or keys it needs that do not exist.
    pub missing_secrets: Vec<String>,
    /// How its fallback cycles are resolved, appended to the Accepted message.
    pub cycle_note: String,
}

/// Adds `item` unless present: the same problem is found once per region.
fn push_unique(list: &mut Vec<String>, item: String) {
    if !list.contains(&item) {
        list.push(item);
    }
}

/// The RoutingPolicy status fields the operator owns, as the JSON it applies.
pub fn policy_status(policy: &RoutingPolicy, facts: &PolicyFacts, now: &Time) -> Value {
    let pool = &policy.spec.pool_ref.name;
    let (accepted, resolved, served) = match facts {
        PolicyFacts::PoolMissing { namespace } => {
            let msg = format!(
                "spec.poolRef.name: ProviderPool {pool:?} not found in namespace {namespace:?}"
            );
            (
                Desired {
                    type_: types::ACCEPTED,
                    status: false,
                    reason: "PoolNotFound",
                    message: msg.clone(),
                },
                Desired {
                    type_: types::RESOLVED_REFS,
                    status: false,
                    reason: "PoolNotFound",
                    message: msg,
                },
                BTreeSet::new(),
            )
        }
        PolicyFacts::Compiled(seen) => {
            let mut errors = Vec::new();
            let mut unknown_providers = Vec::new();
            for e in &seen.errors {
                if e.kind == PolicyErrorKind::UnknownProvider {
                    push_unique(&mut unknown_providers, e.to_string());
                }
                push_unique(&mut errors, e.to_string());
            }
            let mut conflicts = Vec::new();
            for c in &seen.conflicts {
                push_unique(&mut conflicts, c.clone());
            }
            let mut served = seen.compiled.clone();
            let not_yet: Vec<String> = served.difference(&seen.in_cluster).cloned().collect();
            // A refused edit leaves the routes the policy served before in place (see
            // `Compiled::carry_over`); say which.
            if !errors.is_empty() && !seen.in_cluster.is_empty() {
                let generation = policy.metadata.generation.unwrap_or_default();
                let models = seen
                    .in_cluster
                    .iter()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ");
                errors.push(format!(
                    "generation {generation} was refused, so the routes it would have replaced ({models}) are still served as before"
                ));
                served.extend(seen.in_cluster.iter().cloned());
            }
            let accepted = if !errors.is_empty() {
                Desired {
                    type_: types::ACCEPTED,
                    status: false,
                    reason: "Invalid",
                    message: errors.join("; "),
                }
            } else if !conflicts.is_empty() {
                // The routes it does not lose are served: say so, or the whole policy
                // reads as refused.
                let live: Vec<String> = served.intersection(&seen.in_cluster).cloned().collect();
                let mut text = conflicts.join("; ");
                if live.is_empty() && not_yet.is_empty() {
                    text.push_str("; none of its routes is served");
                }
                if !live.is_empty() {
                    text.push_str(&format!(
                        "; its other routes ({}) are served",
                        live.join(", ")
                    ));
                }
                if !not_yet.is_empty() {
                    text.push_str(&format!(
                        "; its routes for {} are not in the gateways' configuration yet",
                        not_yet.join(", ")
                    ));
                }
                Desired {
                    type_: types::ACCEPTED,
                    status: false,
                    reason: "RouteConflict",
                    message: text,
                }
            } else if !not_yet.is_empty() {
                // Accepted means the gateways run it, not only that it compiles.
                Desired {
                    type_: types::ACCEPTED,
                    status: false,
                    reason: "Pending",
                    message: format!(
                        "compiles, but the gateways' configuration does not hold its routes for {} yet; if this lasts, the ProviderPool's Ready condition says why",
                        not_yet.join(", ")
                    ),
                }
            } else {
                Desired {
                    type_: types::ACCEPTED,
                    status: true,
                    reason: "Accepted",
                    message: format!(
                        "compiled into every region of ProviderPool {pool:?}{}",
                        seen.cycle_note
                    ),
                }
            };
            let resolved = if !unknown_providers.is_empty() {
                Desired {
                    type_: types::RESOLVED_REFS,
                    status: false,
                    reason: "ProviderNotFound",
                    message: unknown_providers.join("; "),
                }
            } else if !seen.missing_secrets.is_empty() {
                Desired {
                    type_: types::RESOLVED_REFS,
                    status: false,
                    reason: "SecretNotFound",
                    message: seen.missing_secrets.join("; "),
                }
            } else {
                Desired {
                    type_: types::RESOLVED_REFS,
                    status: true,
                    reason: "ResolvedRefs",
                    message: "the pool, its providers and every referenced Secret exist".to_owned(),
                }
            };
            (accepted, resolved, served)
        }
    };
    let existing = policy.status.clone().unwrap_or_default();
    let conditions = merge(
        &existing.conditions,
        vec![accepted, resolved],
        policy.metadata.generation,
        now,
    );
    // In the policy's own order.
    let routes: Vec<&str> = policy
        .spec
        .routes
        .iter()
        .map(|r| r.model.as_str())
        .filter(|m| served.contains(*m))
        .collect();
    json!({
        "observedGeneration": policy.metadata.generation,
        "conditions": conditions,
        "routes": if routes.is_empty() { Value::Null } else { Value::String(routes.join(",")) },
    })
}

/// Whether applying `desired` would change the policy status the operator owns.
pub fn policy_status_changed(current: &RoutingPolicyStatus, desired: &Value) -> bool {
    let current = serde_json::to_value(current).unwrap_or(Value::Null);
    ["observedGeneration", "conditions", "routes"]
        .iter()
        .any(|k| current.get(*k).unwrap_or(&Value::Null) != desired.get(*k).unwrap_or(&Value::Null))
}

/// Whether applying `desired` would change what `current` (the live status) shows for
/// the fields the operator owns.
pub fn pool_status_changed(current: Option<&ProviderPoolStatus>, desired: &Value) -> bool {
    let Some(current) = current else { return true };
    let Ok(current) = serde_json::to_value(current) else {
        return true;
    };
    let regions_now: Vec<Value> = current
        .get("regions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|r| {
            json!({"name": r.get("name"), "desiredReplicas": r.get("desiredReplicas"),
                   "readyReplicas": r.get("readyReplicas"), "configRevision": r.get("configRevision")})
        })
        .collect();
    [
        "observedGeneration",
        "conditions",
        "readyRegions",
        "healthyProviders",
    ]
    .iter()
    .any(|k| current.get(*k) != desired.get(*k))
        || Some(&Value::Array(regions_now)) != desired.get("regions")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crds::status::{ProviderHealthStatus, RegionStatus};
    use k8s_openapi::jiff::Timestamp;

    fn pool() -> ProviderPool {
        serde_json::from_value(json!({
            "apiVersion": "switchyard.dev/v1alpha1", "kind": "ProviderPool",
            "metadata": {"name": "chat", "namespace": "ns", "generation": 3},
            "spec": {"regions": [{"name": "us-east"}, {"name": "eu-west"}],
                     "providers": [
                        {"name": "a", "type": "openaiCompatible", "endpoint": "http://a", "region": "us-east", "models": [{"name": "m"}]},
                        {"name": "b", "type": "openaiCompatible", "endpoint": "http://b", "region": "eu-west", "models": [{"name": "m"}]}]}
        }))
        .expect("valid")
    }

    fn obs(name: &str, ready: i32) -> RegionObservation {
        RegionObservation {
            stuck: None,
            routes: 1,
            name: name.into(),
            desired: 2,
            ready,
            revision: "r1".into(),
        }
    }

    fn now() -> Time {
        Time(Timestamp::from_second(1_000).expect("valid"))
    }

    fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
        status["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == type_))
            .expect("condition present")
    }

    #[test]
    fn ready_when_every_region_runs_its_replicas() {
        let status = pool_status(
            &pool(),
            &[obs("us-east", 2), obs("eu-west", 2)],
            None,
            &[],
            &now(),
        );
        assert_eq!(condition(&status, "Ready")["status"], "True");
        assert_eq!(condition(&status, "Ready")["reason"], "AllRegionsReady");
        assert_eq!(condition(&status, "Progressing")["status"], "False");
        assert_eq!(status["readyRegions"], "2/2");
        assert_eq!(status["observedGeneration"], 3);
    }

    #[test]
    fn not_ready_and_progressing_while_a_region_rolls_out() {
        let status = pool_status(
            &pool(),
            &[obs("us-east", 2), obs("eu-west", 1)],
            None,
            &[],
            &now(),
        );
        assert_eq!(condition(&status, "Ready")["status"], "False");
        assert_eq!(
            condition(&status, "Ready")["message"],
            "waiting for gateway replicas in eu-west"
        );
        assert_eq!(condition(&status, "Progressing")["reason"], "RollingOut");
        assert_eq!(status["readyRegions"], "1/2");
    }

    #[test]
    fn gateway_reported_ejections_degrade_the_pool() {
        let mut p = pool();
        p.status = Some(ProviderPoolStatus {
            regions: vec![RegionStatus {
                name: "us-east".into(),
                providers: vec![
                    ProviderHealthStatus {
                        name: "a".into(),
                        state: HealthState::Ejected,
                        ..Default::default()
                    },
                    ProviderHealthStatus {
                        name: "b".into(),
                        state: HealthState::Healthy,
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }],
            ..Default::default()
        });
        let status = pool_status(
            &p,
            &[obs("us-east", 2), obs("eu-west", 2)],
            None,
            &[],
            &now(),
        );
        assert_eq!(condition(&status, "Degraded")["status"], "True");
        assert_eq!(
            condition(&status, "Degraded")["message"],
            "ejected by gateways: us-east/a"
        );
        assert_eq!(status["healthyProviders"], "1/2");
    }

    #[test]
    fn an_unchanged_world_needs_no_write() {
        let mut p = pool();
        let first = pool_status(
            &p,
            &[obs("us-east", 2), obs("eu-west", 2)],
            None,
            &[],
            &now(),
        );
        p.status = Some(serde_json::from_value(first.clone()).expect("status"));
        let later = Time(Timestamp::from_second(5_000).expect("valid"));
        let second = pool_status(
            &p,
            &[obs("us-east", 2), obs("eu-west", 2)],
            None,
            &[],
            &later,
        );
        assert!(!pool_status_changed(p.status.as_ref(), &second));
        let third = pool_status(
            &p,
            &[obs("us-east", 1), obs("eu-west", 2)],
            None,
            &[],
            &later,
        );
        assert!(pool_status_changed(p.status.as_ref(), &third));
    }

    #[test]
    fn a_region_whose_pods_cannot_start_says_why() {
        let mut stuck = obs("eu-west", 0);
        stuck.stuck = Some(Stuck {
            reason: "PodsUnschedulable",
            message: "pods cannot be scheduled: 0/9 nodes are available".into(),
        });
        let status = pool_status(&pool(), &[obs("us-east", 2), stuck], None, &[], &now());
        let ready = condition(&status, "Ready");
        assert_eq!(ready["reason"], "PodsUnschedulable");
        assert_eq!(
            ready["message"],
            "region eu-west has 0/2 gateway replicas ready: pods cannot be scheduled: 0/9 nodes are available"
        );
    }

    fn policy() -> RoutingPolicy {
        serde_json::from_value(json!({
            "apiVersion": "switchyard.dev/v1alpha1", "kind": "RoutingPolicy",
            "metadata": {"name": "team", "namespace": "ns", "generation": 4},
            "spec": {"poolRef": {"name": "chat"}, "routes": [
                {"model": "m", "targets": [{"provider": "a"}]},
                {"model": "mini", "targets": [{"provider": "a"}]}]}
        }))
        .expect("valid")
    }

    fn models(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|m| (*m).to_owned()).collect()
    }

    fn policy_conditions(facts: PolicyFacts) -> (Value, Value, Value) {
        let status = policy_status(&policy(), &facts, &now());
        (
            condition(&status, "Accepted").clone(),
            condition(&status, "ResolvedRefs").clone(),
            status["routes"].clone(),
        )
    }

    #[test]
    fn a_policy_is_accepted_only_once_its_routes_are_in_the_gateways_config() {
        let compiled = PolicyCompiled {
            compiled: models(&["m", "mini"]),
            in_cluster: models(&["m"]),
            ..Default::default()
        };
        let (accepted, _, routes) = policy_conditions(PolicyFacts::Compiled(compiled.clone()));
        assert_eq!(accepted["reason"], "Pending");
        assert!(
            accepted["message"]
                .as_str()
                .is_some_and(|m| m.contains("its routes for mini yet")),
            "{accepted}"
        );
        assert_eq!(routes, "m,mini");
        let (accepted, refs, _) = policy_conditions(PolicyFacts::Compiled(PolicyCompiled {
            in_cluster: models(&["m", "mini"]),
            ..compiled
        }));
        assert_eq!(
            (accepted["status"].as_str(), accepted["reason"].as_str()),
            (Some("True"), Some("Accepted"))
        );
        assert_eq!(refs["status"], "True");
    }

    #[test]
    fn a_refused_edit_names_its_errors_and_the_routes_still_served() {
        let unknown = PolicyError {
            kind: PolicyErrorKind::UnknownProvider,
            field: "spec.routes[0].targets[0].provider".into(),
            message: "provider \"typo\" is not in ProviderPool \"chat\"".into(),
        };
        let (accepted, refs, routes) = policy_conditions(PolicyFacts::Compiled(PolicyCompiled {
            // Found in two regions, said once.
            errors: vec![unknown.clone(), unknown],
            in_cluster: models(&["m", "mini"]),
            ..Default::default()
        }));
        assert_eq!(accepted["reason"], "Invalid");
        assert_eq!(
            accepted["message"],
            "spec.routes[0].targets[0].provider: provider \"typo\" is not in ProviderPool \"chat\"; generation 4 was refused, so the routes it would have replaced (m, mini) are still served as before"
        );
        assert_eq!(
            (refs["status"].as_str(), refs["reason"].as_str()),
            (Some("False"), Some("ProviderNotFound"))
        );
        assert_eq!(routes, "m,mini");
    }

    #[test]
    fn a_policy_losing_a_model_says_which_of_its_routes_are_served() {
        let (accepted, _, routes) = policy_conditions(PolicyFacts::Compiled(PolicyCompiled {
            conflicts: vec![
                "model \"m\" is already served by the older RoutingPolicy \"old\"".into(),
            ],
            compiled: models(&["mini"]),
            in_cluster: models(&["mini"]),
            ..Default::default()
        }));
        assert_eq!(accepted["reason"], "RouteConflict");
        assert!(
            accepted["message"]
                .as_str()
                .is_some_and(|m| m.ends_with("; its other routes (mini) are served")),
            "{accepted}"
        );
        assert_eq!(routes, "mini");
    }

    #[test]
    fn a_missing_pool_is_named() {
        let (accepted, refs, routes) = policy_conditions(PolicyFacts::PoolMissing {
            namespace: "ns".into(),
        });
        assert_eq!(accepted["reason"], "PoolNotFound");
        assert_eq!(
            refs["message"],
            "spec.poolRef.name: ProviderPool \"chat\" not found in namespace \"ns\""
        );
        assert!(routes.is_null());
    }

    #[test]
    fn drained_providers_are_counted_not_hidden() {
        let mut p = pool();
        p.spec.providers[1].enabled = false;
        let status = pool_status(
            &p,
            &[obs("us-east", 2), obs("eu-west", 2)],
            None,
            &[],
            &now(),
        );
        assert_eq!(status["healthyProviders"], "0/1, 1 drained");
    }
}
