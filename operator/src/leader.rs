//! Leader election on a `coordination.k8s.io` Lease: only the holder reconciles, so two
//! replicas never fight. The holder stops acting once a renewal has not succeeded within
//! the renew deadline, which ends before the lease does, so a standby can never take
//! over while the old leader still acts (client-go's `renewDeadline`).

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::time::Instant;

/// How a lease is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How long a lease lasts after its last renewal; a standby waits this long.
    pub lease: Duration,
    /// The holder stops acting when no renewal succeeded for this long; shorter than
    /// `lease` by the margin that covers clock skew and the time a request is in flight.
    pub renew_deadline: Duration,
    /// Time between tries to renew or to acquire.
    pub retry: Duration,
}

impl Timing {
    /// client-go's proportions: renew deadline two thirds of the lease, a try every
    /// seventh of it.
    pub fn for_lease(lease: Duration) -> Self {
        Self {
            lease,
            renew_deadline: lease * 2 / 3,
            retry: lease / 7,
        }
    }
}

/// Why a holder stopped leading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lost {
    /// Another replica holds the lease.
    TakenOver,
    /// No renewal succeeded within the renew deadline.
    DeadlinePassed,
}

/// Something that takes or renews a lease in one try: true when this replica holds it.
pub trait Renew {
    /// One try; the lease's renew time is taken after the call starts.
    fn try_acquire(&self) -> impl Future<Output = Result<bool, kube::Error>> + Send;
}

/// Tries until the lease is held; returns the instant the winning try started, from
/// which the renew deadline counts.
pub async fn acquire<R: Renew>(lease: &R, timing: Timing) -> Instant {
    loop {
        let sent = Instant::now();
        match lease.try_acquire().await {
            Ok(true) => return sent,
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "leader election"),
        }
        tokio::time::sleep(timing.retry).await;
    }
}

/// Renews the lease held since `renewed` until it is lost; returns as soon as the renew
/// deadline passes, even while a renewal request is still waiting for an answer. The
/// caller must stop acting at once.
pub async fn hold<R: Renew>(lease: &R, timing: Timing, mut renewed: Instant) -> Lost {
    loop {
        let give_up = renewed + timing.renew_deadline;
        tokio::time::sleep_until((Instant::now() + timing.retry).min(give_up)).await;
        let sent = Instant::now();
        if sent >= give_up {
            return Lost::DeadlinePassed;
        }
        match tokio::time::timeout_at(give_up, lease.try_acquire()).await {
            Ok(Ok(true)) => renewed = sent,
            Ok(Ok(false)) => return Lost::TakenOver,
            Ok(Err(e)) => tracing::warn!(error = %e, "renewing the lease failed"),
            Err(_) => return Lost::DeadlinePassed,
        }
    }
}

/// A lease to hold.
#[derive(Debug, Clone)]
pub struct LeaderElection {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

impl LeaderElection {
    /// The lease `name` in `namespace`, held as `identity`.
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            identity: identity.to_owned(),
            duration,
        }
    }

    async fn take_or_renew(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let seconds = i32::try_from(self.duration.as_secs()).unwrap_or(15);
        match self.api.get_opt(&self.name).await? {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.identity.clone()),
                        lease_duration_seconds: Some(seconds),
                        acquire_time: Some(MicroTime(now)),
                        renew_time: Some(MicroTime(now)),
                        lease_transitions: Some(0),
                        ..LeaseSpec::default()
                    }),
                };
                match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                    Err(e) => Err(e),
                }
            }
            Some(mut lease) => {
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                let mine = spec.holder_identity.as_deref() == Some(self.identity.as_str());
                let expired = spec.renew_time.as_ref().is_none_or(|t| {
                    let duration = SignedDuration::from_secs(i64::from(
                        spec.lease_duration_seconds.unwrap_or(seconds),
                    ));
                    t.0.checked_add(duration).is_ok_and(|until| until < now)
                });
                if !mine && !expired {
                    return Ok(false);
                }
                if !mine {
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                    spec.acquire_time = Some(MicroTime(now));
                    spec.holder_identity = Some(self.identity.clone());
                }
                spec.renew_time = Some(MicroTime(now));
                spec.lease_duration_seconds = Some(seconds);
                // The resourceVersion makes this a compare-and-swap: two candidates cannot
                // both win.
                match self
                    .api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
                {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                    Err(e) => Err(e),
                }
            }
        }
    }
}

impl Renew for LeaderElection {
    fn try_acquire(&self) -> impl Future<Output = Result<bool, kube::Error>> + Send {
        self.take_or_renew()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use super::*;

    /// What one try does.
    #[derive(Clone, Copy)]
    enum Reply {
        Held,
        NotHeld,
        Fails,
        /// The API server never answers.
        Hangs,
    }

    /// A lease whose tries follow a script (the last reply repeats), recording when each
    /// try started.
    struct Scripted {
        replies: Mutex<VecDeque<Reply>>,
        started: Mutex<Vec<Instant>>,
    }

    impl Scripted {
        fn new(replies: &[Reply]) -> Self {
            Self {
                replies: Mutex::new(replies.iter().copied().collect()),
                started: Mutex::new(Vec::new()),
            }
        }
    }

    impl Renew for Scripted {
        fn try_acquire(&self) -> impl Future<Output = Result<bool, kube::Error>> + Send {
            self.started.lock().expect("lock").push(Instant::now());
            let reply = {
                let mut replies = self.replies.lock().expect("lock");
                if replies.len() > 1 {
                    replies.pop_front()
                } else {
                    replies.front().copied()
                }
            };
            async move {
                match reply.unwrap_or(Reply::Held) {
                    Reply::Held => Ok(true),
                    Reply::NotHeld => Ok(false),
                    Reply::Fails => Err(kube::Error::LinesCodecMaxLineLengthExceeded),
                    Reply::Hangs => std::future::pending().await,
                }
            }
        }
    }

    const TIMING: Timing = Timing {
        lease: Duration::from_secs(15),
        renew_deadline: Duration::from_secs(10),
        retry: Duration::from_secs(2),
    };

    #[tokio::test(start_paused = true)]
    async fn a_hanging_renewal_stops_the_leader_at_its_renew_deadline_before_the_lease_ends() {
        let lease = Scripted::new(&[Reply::Held, Reply::Held, Reply::Hangs]);
        let start = Instant::now();
        let acquired = acquire(&lease, TIMING).await;
        let lost = hold(&lease, TIMING, acquired).await;
        assert_eq!(lost, Lost::DeadlinePassed);
        let started = lease.started.lock().expect("lock").clone();
        // Taken at 0, renewed at 2, then the renewal sent at 4 never returns.
        assert_eq!(started[1] - start, Duration::from_secs(2));
        let last_good = started[1];
        assert_eq!(Instant::now() - last_good, TIMING.renew_deadline);
        assert!(
            Instant::now() < last_good + TIMING.lease,
            "the leader stopped before a standby may take the lease"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failing_renewals_stop_the_leader_at_its_renew_deadline() {
        let lease = Scripted::new(&[Reply::Held, Reply::Fails]);
        let acquired = acquire(&lease, TIMING).await;
        assert_eq!(hold(&lease, TIMING, acquired).await, Lost::DeadlinePassed);
        assert_eq!(Instant::now() - acquired, TIMING.renew_deadline);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_taken_over_stops_the_leader_at_once_and_renewals_keep_it() {
        let lease = Scripted::new(&[
            Reply::NotHeld,
            Reply::Held,
            Reply::Held,
            Reply::Fails,
            Reply::Held,
            Reply::NotHeld,
        ]);
        let start = Instant::now();
        let acquired = acquire(&lease, TIMING).await;
        assert_eq!(acquired - start, TIMING.retry, "a standby tries again");
        assert_eq!(hold(&lease, TIMING, acquired).await, Lost::TakenOver);
        assert_eq!(
            Instant::now() - acquired,
            TIMING.retry * 4,
            "one failed renewal in between is tolerated"
        );
    }

    #[test]
    fn the_default_proportions_leave_a_margin_before_the_lease_ends() {
        let t = Timing::for_lease(Duration::from_secs(15));
        assert_eq!(t.renew_deadline, Duration::from_secs(10));
        assert!(t.retry * 3 < t.renew_deadline);
    }
}
