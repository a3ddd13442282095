//! Leader election with a `coordination.k8s.io/v1` Lease, so that exactly one agent writes
//! Service status and Events.
//!
//! - [`Elector`] is the pure state machine: given the Lease as last read and the time, it says
//!   what to write ([`LeaseAction`]) and whether this agent leads.
//! - [`LeaseLock`] is the thin I/O part: read the Lease, write what the elector decided.
//!
//! Rules:
//!
//! - Every write is conditioned on the resource version that was read (`create` fails with
//!   `409 AlreadyExists` when another agent created it first, `replace` with `409 Conflict` when
//!   anyone wrote it since), so of two agents racing for the Lease only one wins.
//! - Expiry is measured on this agent's monotonic clock, from when it *saw* the Lease record
//!   change, never from the `renewTime` written by another machine: clock skew between nodes
//!   does not matter. Another holder's Lease is taken over once it has not changed for its
//!   `leaseDurationSeconds`.
//! - A leader leads until [`LeaseSettings::renew_deadline`] after its last successful renewal
//!   (counted from before the request was sent); the deadline is shorter than the lease duration,
//!   so it stops writing before any other agent may take over. It stops at once when it reads a
//!   Lease that names someone else, or none.
//! - A Lease whose holder is this agent's identity is renewed at once (a restarted agent on the
//!   same node continues); a Lease with no holder (released) is taken at once.

use std::time::{Duration, Instant};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{PostParams, ResourceExt},
};

/// Name of the Lease unless `--ipam-lease` says otherwise.
pub const DEFAULT_LEASE_NAME: &str = "xdp-lb-ipam";

/// Which Lease, who we are, and the timing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseSettings {
    pub namespace: String,
    pub name: String,
    /// `holderIdentity` while we lead: the node (or pod) name.
    pub identity: String,
    /// `leaseDurationSeconds` we write: how long others wait after our last renewal.
    pub duration: Duration,
    /// How often the Lease is renewed (leader) or looked at (others).
    pub renew_interval: Duration,
    /// A leader that could not renew for this long stops leading. Less than `duration`.
    pub renew_deadline: Duration,
}

impl LeaseSettings {
    /// Lease `name` in `namespace` for `identity`, with 15 s duration, 5 s renewal and a 10 s
    /// renew deadline.
    pub fn new(
        namespace: impl Into<String>,
        name: impl Into<String>,
        identity: impl Into<String>,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            duration: Duration::from_secs(15),
            renew_interval: Duration::from_secs(5),
            renew_deadline: Duration::from_secs(10),
        }
    }

    /// Whole seconds, at least 1, as `leaseDurationSeconds` needs.
    fn duration_seconds(&self) -> i32 {
        i32::try_from(self.duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }
}

/// What [`Elector::decide`] wants written.
#[derive(Clone, Debug, PartialEq)]
pub enum LeaseAction {
    /// There is no Lease: create it, naming us.
    Create(Lease),
    /// Renew our Lease or take over a free or expired one: replace it with this object, which
    /// carries the resource version that was read.
    Replace(Lease),
    /// Another agent holds a live Lease.
    Wait { holder: String },
}

/// The parts of a Lease whose change shows that its holder is alive.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Record {
    resource_version: Option<String>,
    holder: Option<String>,
    renew_time: Option<Timestamp>,
}

impl Record {
    fn of(lease: &Lease) -> Self {
        let spec = lease.spec.as_ref();
        Self {
            resource_version: lease.metadata.resource_version.clone(),
            holder: spec.and_then(|s| s.holder_identity.clone()),
            renew_time: spec.and_then(|s| s.renew_time.as_ref()).map(|t| t.0),
        }
    }
}

/// The leader-election state machine. Pure: the caller reads and writes the Lease and passes
/// the time in.
#[derive(Clone, Debug)]
pub struct Elector {
    settings: LeaseSettings,
    /// The Lease record as last read, and when (our clock) it was first seen like that.
    observed: Option<(Record, Instant)>,
    /// While we lead: when the last successful write was started.
    renewed_at: Option<Instant>,
}

impl Elector {
    pub fn new(settings: LeaseSettings) -> Self {
        Self {
            settings,
            observed: None,
            renewed_at: None,
        }
    }

    pub fn settings(&self) -> &LeaseSettings {
        &self.settings
    }

    /// Do we lead at `now`?
    pub fn is_leader(&self, now: Instant) -> bool {
        self.renewed_at
            .is_some_and(|t| now.saturating_duration_since(t) < self.settings.renew_deadline)
    }

    /// Decide what to write, given the Lease as just read (`None`: it does not exist). `now`
    /// is this agent's monotonic clock, `wall` the time written into the Lease.
    pub fn decide(
        &mut self,
        current: Option<&Lease>,
        now: Instant,
        wall: Timestamp,
    ) -> LeaseAction {
        let Some(lease) = current else {
            self.renewed_at = None;
            self.observed = None;
            return LeaseAction::Create(self.lease(None, wall, wall, 0));
        };
        let record = Record::of(lease);
        if self.observed.as_ref().map(|(r, _)| r) != Some(&record) {
            self.observed = Some((record.clone(), now));
        }
        let seen_at = self.observed.as_ref().map_or(now, |(_, at)| *at);
        let spec = lease.spec.clone().unwrap_or_default();
        let transitions = spec.lease_transitions.unwrap_or(0);
        let rv = lease.metadata.resource_version.clone();
        match record.holder.filter(|h| !h.is_empty()) {
            Some(holder) if holder == self.settings.identity => {
                let acquired = spec.acquire_time.map_or(wall, |t| t.0);
                LeaseAction::Replace(self.lease(rv, acquired, wall, transitions))
            }
            None => {
                self.renewed_at = None;
                LeaseAction::Replace(self.lease(rv, wall, wall, transitions.saturating_add(1)))
            }
            Some(holder) => {
                self.renewed_at = None;
                let duration = spec
                    .lease_duration_seconds
                    .and_then(|s| u64::try_from(s).ok())
                    .filter(|s| *s > 0)
                    .map_or(self.settings.duration, Duration::from_secs);
                if now.saturating_duration_since(seen_at) >= duration {
                    LeaseAction::Replace(self.lease(rv, wall, wall, transitions.saturating_add(1)))
                } else {
                    LeaseAction::Wait { holder }
                }
            }
        }
    }

    /// Does `current`, the Lease as just read from the server, still show exactly what our
    /// last write left there, and do we lead at `now`? The fence before every IPAM write: an
    /// agent whose Lease anyone else has written since (a takeover after a pause, a deleted
    /// Lease) does not write, whatever its own clock says.
    pub fn confirms(&self, current: Option<&Lease>, now: Instant) -> bool {
        let (Some(lease), Some((ours, _))) = (current, self.observed.as_ref()) else {
            return false;
        };
        self.is_leader(now)
            && ours.holder.as_deref() == Some(self.settings.identity.as_str())
            && Record::of(lease) == *ours
    }

    /// The write decided at `started` succeeded; the server returned `written`.
    pub fn written(&mut self, written: &Lease, started: Instant) {
        self.observed = Some((Record::of(written), started));
        self.renewed_at = Some(started);
    }

    /// The Lease to write to give it up, if `current` names us: no holder, so the next agent
    /// takes it at once.
    pub fn release(&mut self, current: &Lease, wall: Timestamp) -> Option<Lease> {
        self.renewed_at = None;
        let spec = current.spec.as_ref()?;
        if spec.holder_identity.as_deref() != Some(self.settings.identity.as_str()) {
            return None;
        }
        let mut lease = current.clone();
        lease.metadata.managed_fields = None;
        lease.spec = Some(LeaseSpec {
            holder_identity: None,
            lease_duration_seconds: Some(1),
            renew_time: Some(MicroTime(wall)),
            ..spec.clone()
        });
        Some(lease)
    }

    fn lease(
        &self,
        resource_version: Option<String>,
        acquired: Timestamp,
        renewed: Timestamp,
        transitions: i32,
    ) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some(self.settings.name.clone()),
                namespace: Some(self.settings.namespace.clone()),
                resource_version,
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.settings.identity.clone()),
                lease_duration_seconds: Some(self.settings.duration_seconds()),
                acquire_time: Some(MicroTime(acquired)),
                renew_time: Some(MicroTime(renewed)),
                lease_transitions: Some(transitions),
                ..LeaseSpec::default()
            }),
        }
    }
}

/// The Lease through the API: [`Elector`] plus the reads and writes.
pub struct LeaseLock {
    api: Api<Lease>,
    elector: Elector,
}

impl LeaseLock {
    pub fn new(client: Client, settings: LeaseSettings) -> Self {
        Self {
            api: Api::namespaced(client, &settings.namespace),
            elector: Elector::new(settings),
        }
    }

    pub fn settings(&self) -> &LeaseSettings {
        self.elector.settings()
    }

    pub fn is_leader(&self) -> bool {
        self.elector.is_leader(Instant::now())
    }

    /// One round: read the Lease, renew it or try to take it. Every request is bounded by the
    /// renew interval. Returns whether we lead afterwards.
    pub async fn tick(&mut self) -> bool {
        let name = self.elector.settings().name.clone();
        let limit = self.elector.settings().renew_interval;
        let started = Instant::now();
        let current = match bounded(limit, self.api.get_opt(&name)).await {
            Ok(current) => current,
            Err(e) => {
                tracing::warn!(lease = %name, error = %e, "reading the lease failed");
                return self.is_leader();
            }
        };
        let result = match self
            .elector
            .decide(current.as_ref(), started, Timestamp::now())
        {
            LeaseAction::Wait { holder } => {
                tracing::debug!(lease = %name, %holder, "lease held by another agent");
                return self.is_leader();
            }
            LeaseAction::Create(lease) => {
                bounded(limit, self.api.create(&PostParams::default(), &lease)).await
            }
            LeaseAction::Replace(lease) => {
                bounded(
                    limit,
                    self.api.replace(&name, &PostParams::default(), &lease),
                )
                .await
            }
        };
        match result {
            Ok(written) => self.elector.written(&written, started),
            // Someone else wrote first: they won this round.
            Err(LeaseError::Api(kube::Error::Api(s)))
                if s.is_conflict() || s.is_already_exists() =>
            {
                tracing::debug!(lease = %name, "lease written by another agent first");
            }
            Err(e) => tracing::warn!(lease = %name, error = %e, "writing the lease failed"),
        }
        self.is_leader()
    }

    /// Read the Lease and check that it is still ours as we last wrote it
    /// ([`Elector::confirms`]); bounded by the renew interval.
    pub async fn confirm(&self) -> Fence {
        let name = &self.elector.settings().name;
        let limit = self.elector.settings().renew_interval;
        let started = Instant::now();
        match bounded(limit, self.api.get_opt(name)).await {
            Ok(current) if self.elector.confirms(current.as_ref(), started) => Fence::Held,
            Ok(current) => {
                let holder = current
                    .as_ref()
                    .and_then(|l| l.spec.as_ref())
                    .and_then(|s| s.holder_identity.clone());
                tracing::info!(lease = %name, holder = ?holder, "IPAM: the lease is no longer ours as last written");
                Fence::Lost
            }
            Err(e) => {
                tracing::warn!(lease = %name, error = %e, "IPAM: reading the lease before a write failed");
                Fence::Unknown
            }
        }
    }

    /// Give the Lease up if we hold it, so another agent takes over without waiting for expiry.
    pub async fn release(&mut self) {
        let name = self.elector.settings().name.clone();
        let limit = self.elector.settings().renew_interval;
        let Ok(Some(current)) = bounded(limit, self.api.get_opt(&name)).await else {
            return;
        };
        let Some(lease) = self.elector.release(&current, Timestamp::now()) else {
            return;
        };
        match bounded(
            limit,
            self.api.replace(&name, &PostParams::default(), &lease),
        )
        .await
        {
            Ok(_) => tracing::info!(lease = %current.name_any(), "lease released"),
            Err(e) => tracing::warn!(lease = %name, error = %e, "releasing the lease failed"),
        }
    }
}

/// What [`LeaseLock::confirm`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fence {
    /// The Lease is ours, as we last wrote it, and our renew deadline has not passed.
    Held,
    /// Someone else wrote the Lease, or our deadline passed: do not write.
    Lost,
    /// The Lease could not be read: do not write now, try again later.
    Unknown,
}

#[derive(Debug, thiserror::Error)]
enum LeaseError {
    #[error(transparent)]
    Api(kube::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

async fn bounded<T>(
    limit: Duration,
    fut: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, LeaseError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(result) => result.map_err(LeaseError::Api),
        Err(_) => Err(LeaseError::Timeout(limit)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(identity: &str) -> LeaseSettings {
        LeaseSettings::new("lb-system", DEFAULT_LEASE_NAME, identity)
    }

    fn wall(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).unwrap()
    }

    /// What the API server stores for a write: the object with the next resource version.
    fn stored(lease: &Lease, rv: u64) -> Lease {
        let mut l = lease.clone();
        l.metadata.resource_version = Some(rv.to_string());
        l
    }

    fn holder(l: &Lease) -> Option<&str> {
        l.spec.as_ref()?.holder_identity.as_deref()
    }

    #[test]
    fn creates_a_missing_lease_and_renews_it() {
        let t0 = Instant::now();
        let mut a = Elector::new(settings("node-a"));
        assert!(!a.is_leader(t0));
        let LeaseAction::Create(l) = a.decide(None, t0, wall(0)) else {
            panic!("create expected")
        };
        assert_eq!(holder(&l), Some("node-a"));
        let spec = l.spec.as_ref().unwrap();
        assert_eq!(spec.lease_duration_seconds, Some(15));
        assert_eq!(spec.lease_transitions, Some(0));
        assert_eq!(l.metadata.namespace.as_deref(), Some("lb-system"));
        let l = stored(&l, 1);
        a.written(&l, t0);
        assert!(a.is_leader(t0 + Duration::from_secs(9)));
        assert!(!a.is_leader(t0 + Duration::from_secs(10)), "renew deadline");

        let t1 = t0 + Duration::from_secs(5);
        let LeaseAction::Replace(r) = a.decide(Some(&l), t1, wall(5)) else {
            panic!("renewal expected")
        };
        assert_eq!(
            r.metadata.resource_version.as_deref(),
            Some("1"),
            "conditioned"
        );
        let spec = r.spec.as_ref().unwrap();
        assert_eq!(
            spec.acquire_time,
            Some(MicroTime(wall(0))),
            "acquire time kept"
        );
        assert_eq!(spec.renew_time, Some(MicroTime(wall(5))));
        assert_eq!(spec.lease_transitions, Some(0));
        a.written(&stored(&r, 2), t1);
        assert!(a.is_leader(t1 + Duration::from_secs(9)));
    }

    #[test]
    fn waits_for_a_live_holder_and_takes_over_after_expiry_on_its_own_clock() {
        let t0 = Instant::now();
        let mut leader = Elector::new(settings("node-a"));
        let LeaseAction::Create(l) = leader.decide(None, t0, wall(0)) else {
            panic!()
        };
        let mut lease = stored(&l, 1);
        leader.written(&lease, t0);

        // node-b's wall clock is far ahead: irrelevant, only its own observations count.
        let mut b = Elector::new(settings("node-b"));
        let skew = 3600;
        assert_eq!(
            b.decide(Some(&lease), t0, wall(skew)),
            LeaseAction::Wait {
                holder: "node-a".into()
            }
        );
        // The leader renews every 5 s: b keeps waiting, long past 15 s in total.
        let mut rv = 1;
        for i in 1..=6u64 {
            let t = t0 + Duration::from_secs(5 * i);
            let LeaseAction::Replace(r) = leader.decide(Some(&lease), t, wall(5 * i as i64)) else {
                panic!()
            };
            rv += 1;
            lease = stored(&r, rv);
            leader.written(&lease, t);
            let seen = b.decide(Some(&lease), t, wall(skew));
            assert!(matches!(seen, LeaseAction::Wait { .. }), "{i}: {seen:?}");
        }
        // The leader dies. b saw the last change at t0+30 s; the lease says 15 s.
        let last = t0 + Duration::from_secs(30);
        assert!(matches!(
            b.decide(Some(&lease), last + Duration::from_secs(14), wall(skew)),
            LeaseAction::Wait { .. }
        ));
        let t = last + Duration::from_secs(15);
        let LeaseAction::Replace(take) = b.decide(Some(&lease), t, wall(skew)) else {
            panic!("takeover expected")
        };
        assert_eq!(holder(&take), Some("node-b"));
        let spec = take.spec.as_ref().unwrap();
        assert_eq!(spec.lease_transitions, Some(1));
        assert_eq!(spec.acquire_time, Some(MicroTime(wall(skew))));
        assert_eq!(
            take.metadata.resource_version,
            lease.metadata.resource_version
        );
        assert!(!b.is_leader(t), "not before the write succeeded");
        b.written(&stored(&take, rv + 1), t);
        assert!(b.is_leader(t));
        // The old leader's own deadline passed long before b could take over.
        assert!(!leader.is_leader(last + Duration::from_secs(10)));
    }

    #[test]
    fn a_leader_that_sees_another_holder_steps_down_at_once() {
        let t0 = Instant::now();
        let mut a = Elector::new(settings("node-a"));
        let LeaseAction::Create(l) = a.decide(None, t0, wall(0)) else {
            panic!()
        };
        a.written(&stored(&l, 1), t0);
        assert!(a.is_leader(t0));
        let mut other = stored(&l, 7);
        other.spec.as_mut().unwrap().holder_identity = Some("node-b".into());
        let t1 = t0 + Duration::from_secs(1);
        assert!(matches!(
            a.decide(Some(&other), t1, wall(1)),
            LeaseAction::Wait { .. }
        ));
        assert!(!a.is_leader(t1));
    }

    #[test]
    fn released_or_own_leases_are_taken_at_once() {
        let t0 = Instant::now();
        let mut a = Elector::new(settings("node-a"));
        let LeaseAction::Create(l) = a.decide(None, t0, wall(0)) else {
            panic!()
        };
        let l = stored(&l, 1);
        a.written(&l, t0);
        let released = stored(&a.release(&l, wall(3)).expect("we hold it"), 2);
        assert!(!a.is_leader(t0));
        assert_eq!(holder(&released), None);
        assert_eq!(
            released.spec.as_ref().unwrap().lease_duration_seconds,
            Some(1)
        );

        let mut b = Elector::new(settings("node-b"));
        assert!(b.release(&released, wall(3)).is_none(), "not ours");
        let LeaseAction::Replace(take) = b.decide(Some(&released), t0, wall(4)) else {
            panic!("a free lease is taken at once")
        };
        assert_eq!(holder(&take), Some("node-b"));
        assert_eq!(take.spec.as_ref().unwrap().lease_transitions, Some(1));

        // A restarted agent with the lease's identity continues at once.
        let mut again = Elector::new(settings("node-a"));
        let LeaseAction::Replace(r) = again.decide(Some(&l), t0, wall(5)) else {
            panic!("own lease is renewed")
        };
        assert_eq!(holder(&r), Some("node-a"));
    }

    #[test]
    fn the_write_fence_holds_only_for_the_lease_as_last_written() {
        let t0 = Instant::now();
        let mut a = Elector::new(settings("node-a"));
        let LeaseAction::Create(l) = a.decide(None, t0, wall(0)) else {
            panic!()
        };
        assert!(!a.confirms(None, t0), "nothing written yet");
        let ours = stored(&l, 1);
        assert!(
            !a.confirms(Some(&ours), t0),
            "not before the write succeeded"
        );
        a.written(&ours, t0);
        assert!(a.confirms(Some(&ours), t0 + Duration::from_secs(1)));
        // Our deadline passed (a paused agent resumes): no write, whatever the server shows.
        assert!(!a.confirms(Some(&ours), t0 + Duration::from_secs(10)));
        // Another agent took the Lease over, or merely rewrote it: no write.
        let mut taken = stored(&ours, 2);
        taken.spec.as_mut().unwrap().holder_identity = Some("node-b".into());
        assert!(!a.confirms(Some(&taken), t0 + Duration::from_secs(1)));
        let rewritten = stored(&ours, 3);
        assert!(!a.confirms(Some(&rewritten), t0 + Duration::from_secs(1)));
        assert!(!a.confirms(None, t0 + Duration::from_secs(1)), "deleted");
    }

    #[test]
    fn a_deleted_lease_ends_leadership_and_is_recreated() {
        let t0 = Instant::now();
        let mut a = Elector::new(settings("node-a"));
        let LeaseAction::Create(l) = a.decide(None, t0, wall(0)) else {
            panic!()
        };
        a.written(&stored(&l, 1), t0);
        assert!(matches!(
            a.decide(None, t0 + Duration::from_secs(5), wall(5)),
            LeaseAction::Create(_)
        ));
        assert!(!a.is_leader(t0 + Duration::from_secs(5)));
    }
}
