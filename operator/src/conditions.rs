//! Condition math by Kubernetes API conventions: `lastTransitionTime` moves only when
//! `status` flips, so an unchanged world produces an identical status (and no write).

use crds::k8s::{Condition, Time};

/// A condition as the reconciler computes it, before timestamps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    /// Type, such as `Ready`.
    pub type_: &'static str,
    /// True or false.
    pub status: bool,
    /// Stable CamelCase reason.
    pub reason: &'static str,
    /// Human-readable detail.
    pub message: String,
}

/// Builds the condition list from `desired`, keeping each existing condition's
/// `lastTransitionTime` unless its status flipped.
pub fn merge(
    existing: &[Condition],
    desired: Vec<Desired>,
    generation: Option<i64>,
    now: &Time,
) -> Vec<Condition> {
    desired
        .into_iter()
        .map(|d| {
            let status = if d.status { "True" } else { "False" }.to_owned();
            let last = existing
                .iter()
                .find(|c| c.type_ == d.type_ && c.status == status)
                .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
            Condition {
                type_: d.type_.to_owned(),
                status,
                reason: d.reason.to_owned(),
                message: d.message,
                observed_generation: generation,
                last_transition_time: last,
            }
        })
        .collect()
}

/// Conditions that are good when `False`; every other type is good when `True`, except
/// `Progressing`, which is neither.
const NEGATIVE_POLARITY: [&str; 1] = ["Degraded"];

/// Bad states that are routine and pass by themselves: a rollout under way, a policy
/// waiting for its gateways' ConfigMap.
const ROUTINE: [(&str, &str); 2] = [("Ready", "RegionsNotReady"), ("Accepted", "Pending")];

/// Whether a condition in this state deserves a `Warning` Event rather than a `Normal`
/// one.
pub fn warns(type_: &str, status: &str, reason: &str) -> bool {
    if type_ == "Progressing" || ROUTINE.contains(&(type_, reason)) {
        return false;
    }
    let good_when = if NEGATIVE_POLARITY.contains(&type_) {
        "False"
    } else {
        "True"
    };
    status != good_when
}

/// Which conditions changed status or reason (type, new status, new reason), for Events.
pub fn transitions(before: &[Condition], after: &[Condition]) -> Vec<(String, String, String)> {
    after
        .iter()
        .filter(|a| {
            before
                .iter()
                .find(|b| b.type_ == a.type_)
                .is_none_or(|b| b.status != a.status || b.reason != a.reason)
        })
        .map(|a| (a.type_.clone(), a.status.clone(), a.reason.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warnings_follow_each_conditions_polarity_and_spare_routine_states() {
        assert!(warns("Ready", "False", "NameConflict"));
        assert!(!warns("Ready", "False", "RegionsNotReady"));
        assert!(!warns("Ready", "True", "AllRegionsReady"));
        assert!(warns("Degraded", "True", "SecretNotFound"));
        assert!(!warns("Degraded", "False", "AsExpected"));
        assert!(!warns("Progressing", "True", "RollingOut"));
        assert!(warns("Accepted", "False", "Invalid"));
        assert!(!warns("Accepted", "False", "Pending"));
        assert!(warns("ResolvedRefs", "False", "ProviderNotFound"));
    }
    use k8s_openapi::jiff::Timestamp;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).expect("valid"))
    }

    fn ready(status: bool) -> Desired {
        Desired {
            type_: "Ready",
            status,
            reason: if status {
                "AllRegionsReady"
            } else {
                "RegionsNotReady"
            },
            message: "m".into(),
        }
    }

    #[test]
    fn transition_time_moves_only_when_the_status_flips() {
        let first = merge(&[], vec![ready(false)], Some(1), &at(100));
        assert_eq!(first[0].last_transition_time, at(100));
        let same = merge(&first, vec![ready(false)], Some(1), &at(200));
        assert_eq!(same, first, "nothing changed, so nothing differs");
        let flipped = merge(&same, vec![ready(true)], Some(1), &at(300));
        assert_eq!(flipped[0].last_transition_time, at(300));
        assert_eq!(
            transitions(&same, &flipped),
            [(
                "Ready".to_owned(),
                "True".to_owned(),
                "AllRegionsReady".to_owned()
            )]
        );
        assert!(transitions(&flipped, &flipped).is_empty());
    }

    #[test]
    fn a_new_message_keeps_the_transition_time() {
        let first = merge(&[], vec![ready(false)], Some(1), &at(100));
        let mut d = ready(false);
        d.message = "other".into();
        let next = merge(&first, vec![d], Some(2), &at(200));
        assert_eq!(next[0].last_transition_time, at(100));
        assert_eq!(next[0].observed_generation, Some(2));
    }
}
