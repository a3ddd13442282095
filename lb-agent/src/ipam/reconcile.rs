//! The controller's decisions, pure: pools and Services as the stores hold them in, the status
//! writes and Events to make out ([`Plan`]). The [`Reconciler`] keeps the [`Allocator`] between
//! passes; a pass is level-triggered (it compares what should be with what the objects show),
//! so a write that failed is simply planned again by the next pass.
//!
//! One pass:
//!
//! 1. Pools: each `IPAddressPool` is validated; a pool whose new spec is invalid keeps its last
//!    valid version (an edit with a typo never takes addresses away), a pool without one is
//!    ignored; either way it gets a Warning Event and a `Valid=False` condition, and the other
//!    pools keep working. When the valid pools change, addresses outside every pool are
//!    revoked (Warning `AddressRevoked`) and their Services get new ones. With no valid pool
//!    at all (none created yet, all deleted, the CRD reinstalled) nothing is revoked or
//!    written: the allocations are forgotten, Services without an address are told why, and
//!    the next pass with pools rebuilds everything from the status.
//! 2. Releases: a Service that was deleted, or is no longer ours (type or class changed), gives
//!    its addresses back; a still existing one that is no longer `type: LoadBalancer` has them
//!    removed from its status (Normal `IPReleased`).
//! 3. Restore: a Service of ours that the allocator does not know yet but whose status holds
//!    addresses keeps them (oldest Service first), so a restart or a new leader moves nothing.
//!    An address two Services claim goes to the older one; the other gets a new address. A
//!    Service whose status holds an address that is in no pool (set by hand, or its pool was
//!    deleted while no leader ran) is left alone and reported (Warning `AddressNotInPool`);
//!    its other addresses stay reserved for it.
//! 4. Allocation, oldest Service first: Normal `IPAllocated` when a Service gets new
//!    addresses, Warning `AllocationFailed` / `AddressSharingConflict` (with the reason) when
//!    it cannot; a Service that holds addresses keeps them on failure.
//! 5. Status: `status.loadBalancer.ingress` is written wherever it differs from the allocation.
//!
//! Failures that persist from pass to pass are reported once, when they appear or change.

use std::{
    borrow::Borrow,
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::IpAddr,
};

use k8s_openapi::{
    api::core::v1::{ObjectReference, Service},
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::api::DynamicObject;

use super::{
    AllocError, Allocator, IpAddressPoolSpec, POOL_API_VERSION, POOL_KIND, Pool, PoolError,
    Revoked, ServiceKey, ServiceRequest, events::Notice, ingress_ips, pool::validate_pools,
    service_key,
};
use crate::k8s::{K8sConfig, is_ours};

/// Normal: a Service got new addresses.
pub const IP_ALLOCATED: &str = "IPAllocated";
/// Warning: a Service got no address (or not the one it asked for); the note says why.
pub const ALLOCATION_FAILED: &str = "AllocationFailed";
/// Warning: a Service may not share the address it asked for or held.
pub const SHARING_CONFLICT: &str = "AddressSharingConflict";
/// Warning: an address left every pool and was taken from the Service.
pub const ADDRESS_REVOKED: &str = Revoked::REASON;
/// Warning: the Service's status holds an address outside every pool; it is left alone.
pub const ADDRESS_NOT_IN_POOL: &str = "AddressNotInPool";
/// Normal: a Service that is no longer ours gave its addresses back.
pub const IP_RELEASED: &str = "IPReleased";
/// Warning on an `IPAddressPool`: it is invalid.
pub const INVALID_POOL: &str = PoolError::REASON;

/// The condition type on `IPAddressPool` status.
pub const CONDITION_VALID: &str = "Valid";

/// One `IPAddressPool` as the controller sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolObject {
    pub name: String,
    pub uid: Option<String>,
    pub generation: Option<i64>,
    /// The spec, or why it could not be read.
    pub spec: Result<IpAddressPoolSpec, String>,
    /// The `Valid` condition its status shows.
    pub condition: Option<Condition>,
}

impl PoolObject {
    /// Read a pool from the API object. A spec that does not deserialize is kept as the
    /// error message, so the pool is reported rather than dropped.
    pub fn from_dynamic(obj: &DynamicObject) -> Self {
        let spec = match obj.data.get("spec") {
            None => Err("no spec".to_string()),
            Some(spec) => serde_json::from_value::<IpAddressPoolSpec>(spec.clone())
                .map_err(|e| format!("spec: {e}")),
        };
        let condition = obj
            .data
            .pointer("/status/conditions")
            .and_then(|c| serde_json::from_value::<Vec<Condition>>(c.clone()).ok())
            .and_then(|cs| cs.into_iter().find(|c| c.type_ == CONDITION_VALID));
        Self {
            name: obj.metadata.name.clone().unwrap_or_default(),
            uid: obj.metadata.uid.clone(),
            generation: obj.metadata.generation,
            spec,
            condition,
        }
    }

    pub fn reference(&self) -> ObjectReference {
        ObjectReference {
            api_version: Some(POOL_API_VERSION.to_string()),
            kind: Some(POOL_KIND.to_string()),
            name: Some(self.name.clone()),
            uid: self.uid.clone(),
            ..ObjectReference::default()
        }
    }
}

/// Write `status.loadBalancer.ingress` of a Service (empty: remove every address).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusWrite {
    pub service: ServiceKey,
    pub ips: Vec<IpAddr>,
    /// The Service's `metadata.resourceVersion` the decision was made on: the write is
    /// conditioned on it, so it fails (`409 Conflict`) if anyone changed the Service since,
    /// in particular a newer leader.
    pub resource_version: Option<String>,
}

/// Write the `Valid` condition of a pool.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolStatusWrite {
    pub pool: String,
    pub condition: Condition,
}

/// An Event to publish.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedEvent {
    pub regarding: ObjectReference,
    pub notice: Notice,
}

/// What one pass wants done.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    pub status: Vec<StatusWrite>,
    pub pool_status: Vec<PoolStatusWrite>,
    pub events: Vec<PlannedEvent>,
    /// Deleted Services whose addresses were freed (for the log; nobody to tell).
    pub freed: Vec<(ServiceKey, Vec<IpAddr>)>,
}

/// What a pass reads: the stores' contents, the settings and the time (for conditions).
pub struct Snapshot<'a, S> {
    pub pools: &'a [PoolObject],
    pub services: &'a [S],
    pub config: &'a K8sConfig,
    pub now: Timestamp,
}

/// Who a persistent failure is about.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Subject {
    Service(ServiceKey),
    Pool(String),
}

/// The allocator and what was already reported, between passes.
#[derive(Clone, Debug, Default)]
pub struct Reconciler {
    allocator: Option<Allocator>,
    /// Per pool, the last spec that was valid (used while an edit is invalid).
    last_valid: BTreeMap<String, IpAddressPoolSpec>,
    /// Services whose addresses were revoked and whose status still shows them.
    revoked: BTreeSet<ServiceKey>,
    /// The failure last reported per subject (reported again only when it changes).
    failures: BTreeMap<Subject, Notice>,
}

impl Reconciler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Forget everything (leadership lost): the next pass starts over from the objects.
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    /// The allocator, once a pass ran.
    pub fn allocator(&self) -> Option<&Allocator> {
        self.allocator.as_ref()
    }

    /// One pass; see the module docs.
    pub fn reconcile<S: Borrow<Service>>(&mut self, snap: &Snapshot<'_, S>) -> Plan {
        let mut plan = Plan::default();
        let valid = self.pools(snap, &mut plan);

        let all: BTreeMap<ServiceKey, &Service> = snap
            .services
            .iter()
            .map(|s| (service_key(s.borrow()), s.borrow()))
            .collect();
        let mut ours: Vec<&Service> = all
            .values()
            .copied()
            .filter(|s| is_ours(s, snap.config))
            .collect();
        ours.sort_by_cached_key(|s| {
            (
                s.metadata.creation_timestamp.as_ref().map(|t| t.0),
                service_key(s),
            )
        });
        let our_keys: BTreeSet<ServiceKey> = ours.iter().map(|s| service_key(s)).collect();

        // 0. No valid pool at all (none yet, all deleted, the CRD reinstalled): stand still.
        if valid.is_empty() {
            self.allocator = None;
            self.revoked.clear();
            for svc in ours.iter().filter(|s| ingress_ips(s).is_empty()) {
                self.fail(
                    &mut plan,
                    Subject::Service(service_key(svc)),
                    service_ref(svc),
                    Notice::warning(
                        ALLOCATION_FAILED,
                        "Allocate",
                        "cannot allocate an address: there is no valid IPAddressPool",
                    ),
                );
            }
            self.forget_gone(snap.pools, &our_keys);
            return plan;
        }

        let mut alloc = self.update_pools(valid, &all, &mut plan);
        self.release(&mut alloc, &all, &our_keys, &mut plan);
        let left_alone = self.restore(&mut alloc, &ours, &mut plan);
        self.allocate(&mut alloc, &ours, &left_alone, &mut plan);
        self.forget_gone(snap.pools, &our_keys);
        self.allocator = Some(alloc);
        plan
    }

    /// Step 1: the allocator with the pools in effect; what left every pool is revoked.
    fn update_pools(
        &mut self,
        valid: Vec<Pool>,
        all: &BTreeMap<ServiceKey, &Service>,
        plan: &mut Plan,
    ) -> Allocator {
        match self.allocator.take() {
            None => Allocator::new(valid),
            Some(mut a) if a.pools() != valid.as_slice() => {
                for r in a.update_pools(valid) {
                    if let Some(svc) = all.get(&r.service) {
                        plan.events.push(PlannedEvent {
                            regarding: service_ref(svc),
                            notice: Notice::warning(ADDRESS_REVOKED, "Release", r.to_string()),
                        });
                    }
                    self.revoked.insert(r.service);
                }
                a
            }
            Some(a) => a,
        }
    }

    /// Step 2: Services that were deleted or are no longer ours give their addresses back.
    fn release(
        &mut self,
        alloc: &mut Allocator,
        all: &BTreeMap<ServiceKey, &Service>,
        our_keys: &BTreeSet<ServiceKey>,
        plan: &mut Plan,
    ) {
        let gone: Vec<ServiceKey> = alloc
            .services()
            .map(|(k, _)| k.clone())
            .filter(|k| !our_keys.contains(k))
            .collect();
        for key in gone {
            let ips = alloc.release(&key);
            let Some(svc) = all.get(&key) else {
                plan.freed.push((key, ips));
                continue;
            };
            let spec = svc.spec.clone().unwrap_or_default();
            let why = if spec.type_.as_deref() == Some("LoadBalancer") {
                "its loadBalancerClass is not handled here"
            } else {
                "it is no longer of type LoadBalancer"
            };
            plan.events.push(PlannedEvent {
                regarding: service_ref(svc),
                notice: Notice::normal(
                    IP_RELEASED,
                    "Release",
                    format!("Released IP {}: {why}", ip_list(&ips)),
                ),
            });
            // Status of a Service with another class belongs to that class's controller.
            let clear =
                spec.type_.as_deref() != Some("LoadBalancer") || spec.load_balancer_class.is_none();
            if clear && ingress_ips(svc).iter().any(|ip| ips.contains(ip)) {
                plan.status.push(StatusWrite {
                    service: key,
                    ips: Vec::new(),
                    resource_version: svc.metadata.resource_version.clone(),
                });
            }
        }
    }

    /// Step 3: record what the status shows for Services the allocator does not know yet, oldest
    /// first. Returns the Services left alone (an address in their status is in no pool).
    fn restore(
        &mut self,
        alloc: &mut Allocator,
        ours: &[&Service],
        plan: &mut Plan,
    ) -> BTreeSet<ServiceKey> {
        let mut left_alone: BTreeSet<ServiceKey> = BTreeSet::new();
        for svc in ours {
            let key = service_key(svc);
            let status = ingress_ips(svc);
            let outside: Vec<IpAddr> = status
                .iter()
                .copied()
                .filter(|ip| !alloc.pools().iter().any(|p| p.in_range(*ip)))
                .collect();
            if outside.is_empty() {
                self.revoked.remove(&key);
            } else if !self.revoked.contains(&key) {
                left_alone.insert(key.clone());
                let note = format!(
                    "address{} {} in the status {} in no address pool: the service is left \
                     as it is; create an IPAddressPool that contains {}, or remove {} from \
                     the status",
                    if outside.len() == 1 { "" } else { "es" },
                    ip_list(&outside),
                    if outside.len() == 1 { "is" } else { "are" },
                    if outside.len() == 1 { "it" } else { "them" },
                    if outside.len() == 1 { "it" } else { "them" },
                );
                self.fail(
                    plan,
                    Subject::Service(key.clone()),
                    service_ref(svc),
                    Notice::warning(ADDRESS_NOT_IN_POOL, "Restore", note),
                );
            }
            if status.is_empty() || alloc.addresses_of(&key).is_some() {
                continue;
            }
            let (req, valid_request) = match ServiceRequest::from_service(svc) {
                Ok(req) => (req, true),
                // Still keep its addresses from others (best effort, without sharing).
                Err(_) => (ServiceRequest::new(&key.namespace, &key.name), false),
            };
            let in_pools: Vec<IpAddr> = status
                .iter()
                .copied()
                .filter(|ip| !outside.contains(ip))
                .collect();
            for e in alloc.restore(&req, &in_pools) {
                if valid_request && !left_alone.contains(&key) {
                    plan.events.push(PlannedEvent {
                        regarding: service_ref(svc),
                        notice: failure_notice(&e, "Restore", "the status address is replaced"),
                    });
                }
            }
        }
        left_alone
    }

    /// Steps 4 and 5: allocate, oldest first, and plan the status writes.
    fn allocate(
        &mut self,
        alloc: &mut Allocator,
        ours: &[&Service],
        left_alone: &BTreeSet<ServiceKey>,
        plan: &mut Plan,
    ) {
        for svc in ours {
            let key = service_key(svc);
            if left_alone.contains(&key) {
                continue;
            }
            let subject = Subject::Service(key.clone());
            let req = match ServiceRequest::from_service(svc) {
                Ok(req) => req,
                Err(e) => {
                    // Its status (if any) is left as it is until the request is fixed.
                    self.fail(
                        plan,
                        subject,
                        service_ref(svc),
                        failure_notice(&e, "Allocate", ""),
                    );
                    continue;
                }
            };
            let before: Vec<IpAddr> = alloc.addresses_of(&key).unwrap_or_default().to_vec();
            match alloc.assign(&req) {
                Ok(ips) => {
                    self.failures.remove(&subject);
                    if ips != before {
                        let note = format!(
                            "Assigned IP {} from {}",
                            ip_list(&ips),
                            pools_of(alloc.pools(), &ips)
                        );
                        plan.events.push(PlannedEvent {
                            regarding: service_ref(svc),
                            notice: Notice::normal(IP_ALLOCATED, "Allocate", note),
                        });
                    }
                }
                Err(e) => {
                    let kept = if before.is_empty() {
                        String::new()
                    } else {
                        format!("it keeps {}", ip_list(&before))
                    };
                    self.fail(
                        plan,
                        subject,
                        service_ref(svc),
                        failure_notice(&e, "Allocate", &kept),
                    );
                }
            }
            let desired = alloc.addresses_of(&key).unwrap_or_default();
            if desired != ingress_ips(svc).as_slice() {
                plan.status.push(StatusWrite {
                    service: key,
                    ips: desired.to_vec(),
                    resource_version: svc.metadata.resource_version.clone(),
                });
            }
        }
    }

    /// Forget what is about objects that are gone.
    fn forget_gone(&mut self, pools: &[PoolObject], our_keys: &BTreeSet<ServiceKey>) {
        let pools: BTreeSet<&str> = pools.iter().map(|p| p.name.as_str()).collect();
        self.failures.retain(|s, _| match s {
            Subject::Service(k) => our_keys.contains(k),
            Subject::Pool(p) => pools.contains(p.as_str()),
        });
        self.revoked.retain(|k| our_keys.contains(k));
        self.last_valid.retain(|p, _| pools.contains(p.as_str()));
    }

    /// Validate the pools, plan their conditions and Events; returns the pools in effect.
    fn pools<S>(&mut self, snap: &Snapshot<'_, S>, plan: &mut Plan) -> Vec<Pool> {
        // A pool whose spec is invalid on its own falls back to its last valid spec.
        let mut own_errors: BTreeMap<&str, String> = BTreeMap::new();
        let mut effective: Vec<(&str, IpAddressPoolSpec)> = Vec::new();
        for p in snap.pools {
            let checked = p.spec.clone().and_then(|spec| {
                Pool::from_spec(&p.name, &spec)
                    .map(|_| spec)
                    .map_err(|e| e.message)
            });
            match checked {
                Ok(spec) => effective.push((&p.name, spec)),
                Err(message) => {
                    own_errors.insert(&p.name, message);
                    if let Some(last) = self.last_valid.get(&p.name) {
                        effective.push((&p.name, last.clone()));
                    }
                }
            }
        }
        let (valid, errors) = validate_pools(effective.iter().map(|(n, s)| (*n, s)));
        for p in snap.pools {
            let in_effect = valid.iter().find(|v| v.name == p.name);
            let message = match (own_errors.get(p.name.as_str()), in_effect) {
                (Some(own), Some(_)) => Some(format!(
                    "{own}; the last valid version of the pool stays in use"
                )),
                (Some(own), None) => Some(format!("{own}; the pool is not used")),
                (None, _) => errors
                    .iter()
                    .find(|e| e.pool == p.name)
                    .map(|e| e.message.clone()),
            };
            let condition = match &message {
                Some(m) => condition(false, INVALID_POOL, m),
                None => {
                    if let (Some(pool), Ok(spec)) = (in_effect, &p.spec) {
                        self.last_valid.insert(p.name.clone(), spec.clone());
                        condition(true, "Valid", &describe(pool))
                    } else {
                        condition(true, "Valid", "")
                    }
                }
            };
            if let Some(write) = condition_write(p, condition, snap.now) {
                plan.pool_status.push(write);
            }
            let subject = Subject::Pool(p.name.clone());
            match message {
                Some(m) => self.fail(
                    plan,
                    subject,
                    p.reference(),
                    Notice::warning(INVALID_POOL, "Validate", m),
                ),
                None => {
                    self.failures.remove(&subject);
                }
            }
        }
        valid
    }

    /// Report `notice` unless it is what was last reported about `subject`.
    fn fail(
        &mut self,
        plan: &mut Plan,
        subject: Subject,
        regarding: ObjectReference,
        notice: Notice,
    ) {
        if self.failures.get(&subject) != Some(&notice) {
            self.failures.insert(subject, notice.clone());
            plan.events.push(PlannedEvent { regarding, notice });
        }
    }
}

/// The Event for an allocation error: sharing conflicts apart, everything else
/// `AllocationFailed`; `then` says what happens next.
fn failure_notice(e: &AllocError, action: &str, then: &str) -> Notice {
    let (reason, what) = match e {
        AllocError::PortConflict { .. } | AllocError::BackendMismatch { .. } => {
            (SHARING_CONFLICT, "cannot share the address")
        }
        _ => (ALLOCATION_FAILED, "cannot allocate an address"),
    };
    let mut note = format!("{what}: {e}");
    if !then.is_empty() {
        let _ = write!(note, "; {then}");
    }
    Notice::warning(reason, action, note)
}

fn condition(valid: bool, reason: &str, message: &str) -> Condition {
    Condition {
        type_: CONDITION_VALID.to_string(),
        status: if valid { "True" } else { "False" }.to_string(),
        reason: reason.to_string(),
        message: message.to_string(),
        last_transition_time: Time(Timestamp::UNIX_EPOCH),
        observed_generation: None,
    }
}

/// The condition to write when it differs from what the pool shows; the transition time
/// stays while the status does.
fn condition_write(p: &PoolObject, mut want: Condition, now: Timestamp) -> Option<PoolStatusWrite> {
    want.observed_generation = p.generation;
    let same_status = p.condition.as_ref().filter(|c| c.status == want.status);
    want.last_transition_time = same_status.map_or(Time(now), |c| c.last_transition_time.clone());
    let unchanged = p.condition.as_ref().is_some_and(|c| {
        c.status == want.status
            && c.reason == want.reason
            && c.message == want.message
            && c.observed_generation == want.observed_generation
    });
    (!unchanged).then(|| PoolStatusWrite {
        pool: p.name.clone(),
        condition: want,
    })
}

/// `198.18.0.0-198.18.0.255, 2001:db8::-2001:db8::ff`.
fn describe(pool: &Pool) -> String {
    pool.ranges
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// `[198.18.0.1, 2001:db8::1]`.
fn ip_list(ips: &[IpAddr]) -> String {
    let list: Vec<String> = ips.iter().map(ToString::to_string).collect();
    format!("[{}]", list.join(", "))
}

/// `pool a` or `pools a, b`: the pools the addresses are in.
fn pools_of(pools: &[Pool], ips: &[IpAddr]) -> String {
    let mut names: Vec<&str> = Vec::new();
    for ip in ips {
        if let Some(p) = pools.iter().find(|p| p.in_range(*ip))
            && !names.contains(&p.name.as_str())
        {
            names.push(&p.name);
        }
    }
    let plural = if names.len() == 1 { "" } else { "s" };
    format!("pool{plural} {}", names.join(", "))
}

/// A reference to a Service for Events.
pub fn service_ref(svc: &Service) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".to_string()),
        kind: Some("Service".to_string()),
        namespace: svc.metadata.namespace.clone(),
        name: svc.metadata.name.clone(),
        uid: svc.metadata.uid.clone(),
        ..ObjectReference::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn now() -> Timestamp {
        Timestamp::from_second(1_700_000_000).unwrap()
    }

    fn pool(name: &str, spec: Value) -> PoolObject {
        PoolObject::from_dynamic(
            &serde_json::from_value(json!({
                "apiVersion": POOL_API_VERSION, "kind": POOL_KIND,
                "metadata": {"name": name, "uid": format!("uid-{name}"), "generation": 1},
                "spec": spec,
            }))
            .unwrap(),
        )
    }

    /// A LoadBalancer Service created at second `created`, with this status.
    fn svc(name: &str, created: i64, ingress: &[&str]) -> Service {
        let ingress: Vec<Value> = ingress.iter().map(|i| json!({"ip": i})).collect();
        serde_json::from_value(json!({
            "metadata": {
                "name": name, "namespace": "web", "uid": format!("uid-{name}"),
                "creationTimestamp": Timestamp::from_second(1_600_000_000 + created).unwrap(),
            },
            "spec": {"type": "LoadBalancer", "ports": [{"port": 80}]},
            "status": {"loadBalancer": {"ingress": ingress}},
        }))
        .unwrap()
    }

    fn pass(r: &mut Reconciler, pools: &[PoolObject], services: &[Service]) -> Plan {
        r.reconcile(&Snapshot {
            pools,
            services,
            config: &K8sConfig::default(),
            now: now(),
        })
    }

    /// The services with the status the plan writes.
    fn applied(services: &[Service], plan: &Plan) -> Vec<Service> {
        services
            .iter()
            .map(|s| {
                let mut s = s.clone();
                if let Some(w) = plan.status.iter().find(|w| w.service == service_key(&s)) {
                    let ingress: Vec<Value> =
                        w.ips.iter().map(|i| json!({"ip": i.to_string()})).collect();
                    s.status =
                        serde_json::from_value(json!({"loadBalancer": {"ingress": ingress}}))
                            .unwrap();
                }
                s
            })
            .collect()
    }

    fn reasons(plan: &Plan) -> Vec<(String, String)> {
        plan.events
            .iter()
            .map(|e| {
                (
                    e.regarding.name.clone().unwrap_or_default(),
                    e.notice.reason.clone(),
                )
            })
            .collect()
    }

    fn writes(plan: &Plan) -> Vec<(String, Vec<IpAddr>)> {
        plan.status
            .iter()
            .map(|w| (w.service.name.clone(), w.ips.clone()))
            .collect()
    }

    #[test]
    fn pending_services_get_addresses_oldest_first_and_the_next_pass_is_quiet() {
        let pools = [pool("p", json!({"addresses": ["198.18.0.0/31"]}))];
        let services = [svc("b", 2, &[]), svc("a", 1, &[]), svc("c", 3, &[])];
        let mut r = Reconciler::new();
        let plan = pass(&mut r, &pools, &services);
        assert_eq!(
            writes(&plan),
            [
                ("a".to_string(), vec![ip("198.18.0.0")]),
                ("b".to_string(), vec![ip("198.18.0.1")])
            ]
        );
        let notes: Vec<&str> = plan.events.iter().map(|e| e.notice.note.as_str()).collect();
        assert_eq!(
            notes,
            [
                "Assigned IP [198.18.0.0] from pool p",
                "Assigned IP [198.18.0.1] from pool p",
                "cannot allocate an address: no free IPv4 address left in pool p",
            ]
        );
        assert_eq!(plan.events[2].notice.reason, ALLOCATION_FAILED);
        assert_eq!(plan.events[2].regarding.uid.as_deref(), Some("uid-c"));
        assert_eq!(plan.pool_status.len(), 1);
        let c = &plan.pool_status[0].condition;
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "Valid"));
        assert_eq!(c.message, "198.18.0.0-198.18.0.1");

        // The writes landed: nothing more to do or say.
        let services = applied(&services, &plan);
        let plan = pass(&mut r, &pools, &services);
        assert_eq!(writes(&plan), []);
        assert_eq!(reasons(&plan), [], "the failure is reported once");
    }

    #[test]
    fn a_failed_status_write_is_planned_again() {
        let pools = [pool("p", json!({"addresses": ["198.18.0.0/31"]}))];
        let services = [svc("a", 1, &[])];
        let mut r = Reconciler::new();
        let first = pass(&mut r, &pools, &services);
        let again = pass(&mut r, &pools, &services);
        assert_eq!(writes(&first), writes(&again));
        assert_eq!(reasons(&again), [], "IPAllocated only once");
    }

    #[test]
    fn restore_keeps_addresses_and_resolves_duplicates_by_age() {
        let pools = [pool("p", json!({"addresses": ["198.18.0.0/29"]}))];
        // After a restart: b holds .1 (a fresh allocation would give it .0), c and d both
        // claim .5 (d is older), e is pending.
        let services = [
            svc("b", 2, &["198.18.0.1"]),
            svc("c", 4, &["198.18.0.5"]),
            svc("d", 3, &["198.18.0.5"]),
            svc("e", 5, &[]),
        ];
        let mut r = Reconciler::new();
        let plan = pass(&mut r, &pools, &services);
        assert_eq!(
            writes(&plan),
            [
                ("c".to_string(), vec![ip("198.18.0.0")]),
                ("e".to_string(), vec![ip("198.18.0.2")])
            ]
        );
        let c_event = plan
            .events
            .iter()
            .find(|e| e.regarding.name.as_deref() == Some("c") && e.notice.action == "Restore")
            .expect("c's conflict is reported");
        assert!(
            c_event
                .notice
                .note
                .contains("198.18.0.5 is already used by service web/d"),
            "{}",
            c_event.notice.note
        );
        assert!(
            !plan
                .events
                .iter()
                .any(|e| matches!(e.regarding.name.as_deref(), Some("b" | "d"))),
            "restored addresses are not announced: {:?}",
            reasons(&plan)
        );
    }

    #[test]
    fn status_addresses_outside_every_pool_are_left_alone() {
        let pools = [pool("p", json!({"addresses": ["198.18.0.0/30"]}))];
        let services = [
            svc("hand", 1, &["198.18.9.9"]),
            svc("dual", 2, &["198.18.0.0", "2001:db8::9"]),
            svc("new", 3, &[]),
        ];
        let mut r = Reconciler::new();
        let plan = pass(&mut r, &pools, &services);
        // dual's in-pool address stays reserved: "new" gets the next one.
        assert_eq!(writes(&plan), [("new".to_string(), vec![ip("198.18.0.1")])]);
        let warned: Vec<(String, String)> = reasons(&plan)
            .into_iter()
            .filter(|(_, r)| r == ADDRESS_NOT_IN_POOL)
            .collect();
        assert_eq!(warned.len(), 2, "{warned:?}");
        assert!(
            plan.events[0]
                .notice
                .note
                .starts_with("address [198.18.9.9] in the status is in no address pool"),
            "{}",
            plan.events[0].notice.note
        );
        // No pools at all: nothing is written, pending Services are told why.
        let mut r = Reconciler::new();
        let plan = pass(&mut r, &[], &services);
        assert_eq!(writes(&plan), []);
        assert_eq!(
            reasons(&plan),
            [("new".to_string(), ALLOCATION_FAILED.to_string())]
        );
        assert_eq!(
            plan.events[0].notice.note,
            "cannot allocate an address: there is no valid IPAddressPool"
        );
    }

    #[test]
    fn sharing_conflicts_have_their_own_reason() {
        let pools = [pool("p", json!({"addresses": ["198.18.0.0/30"]}))];
        let shared = |name: &str, created: i64, port: u16| {
            let mut s = svc(name, created, &[]);
            s.metadata.annotations = Some(
                [
                    ("metallb.universe.tf/allow-shared-ip", "dns"),
                    ("metallb.universe.tf/loadBalancerIPs", "198.18.0.3"),
                ]
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .into(),
            );
            s.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].port = i32::from(port);
            s
        };
        let services = [
            shared("tcp", 1, 53),
            shared("web", 2, 80),
            shared("clash", 3, 53),
        ];
        let mut r = Reconciler::new();
        let plan = pass(&mut r, &pools, &services);
        assert_eq!(
            writes(&plan),
            [
                ("tcp".to_string(), vec![ip("198.18.0.3")]),
                ("web".to_string(), vec![ip("198.18.0.3")])
            ]
        );
        let clash = plan.events.last().unwrap();
        assert_eq!(clash.notice.reason, SHARING_CONFLICT);
        assert_eq!(
            clash.notice.note,
            "cannot share the address: address 198.18.0.3 is shared with service web/tcp, \
             which already uses port 53/TCP"
        );
    }

    #[test]
    fn deleting_every_pool_revokes_nothing_and_pools_coming_back_restore() {
        let pools = [pool("p", json!({"addresses": ["198.18.0.0/30"]}))];
        let mut r = Reconciler::new();
        let services = [svc("a", 1, &[]), svc("b", 2, &[])];
        let plan = pass(&mut r, &pools, &services);
        let services = applied(&services, &plan);
        // The CRD is reinstalled: every pool is deleted, then created again.
        let plan = pass(&mut r, &[], &services);
        assert_eq!((writes(&plan), reasons(&plan)), (vec![], vec![]));
        assert!(r.allocator().is_none());
        let plan = pass(&mut r, &pools, &services);
        assert_eq!((writes(&plan), reasons(&plan)), (vec![], vec![]));
        assert_eq!(
            r.allocator()
                .unwrap()
                .addresses_of(&service_key(&services[1])),
            Some([ip("198.18.0.1")].as_slice())
        );
        // An invalid pool alone is no pool either.
        let typo = [pool("p", json!({"addresses": ["198.18.0.1/30"]}))];
        let mut r = Reconciler::new();
        let plan = pass(&mut r, &typo, &services);
        assert_eq!(writes(&plan), []);
        assert_eq!(
            reasons(&plan),
            [("p".to_string(), INVALID_POOL.to_string())]
        );
    }

    #[test]
    fn shrinking_a_pool_revokes_and_reassigns() {
        let mut r = Reconciler::new();
        let wide = [pool("p", json!({"addresses": ["198.18.0.0/30"]}))];
        let services = [svc("a", 1, &[]), svc("b", 2, &[])];
        let plan = pass(&mut r, &wide, &services);
        let services = applied(&services, &plan);
        // .1 leaves the pool; .2 and .3 are new.
        let narrow = [pool(
            "p",
            json!({"addresses": ["198.18.0.0/32", "198.18.0.2/31"]}),
        )];
        let plan = pass(&mut r, &narrow, &services);
        assert_eq!(writes(&plan), [("b".to_string(), vec![ip("198.18.0.2")])]);
        assert_eq!(
            reasons(&plan),
            [
                ("b".to_string(), ADDRESS_REVOKED.to_string()),
                ("b".to_string(), IP_ALLOCATED.to_string())
            ]
        );
        assert_eq!(
            plan.events[0].notice.note,
            "address 198.18.0.1 is no longer in any address pool and was released"
        );
        // Had the write failed, the next pass writes it again (not "left alone").
        let plan = pass(&mut r, &narrow, &services);
        assert_eq!(writes(&plan), [("b".to_string(), vec![ip("198.18.0.2")])]);
        assert_eq!(reasons(&plan), []);
    }

    #[test]
    fn invalid_pools_are_reported_and_an_invalid_edit_keeps_the_last_valid_version() {
        let mut r = Reconciler::new();
        let good = pool("a", json!({"addresses": ["198.18.0.0/31"]}));
        let typo = pool("b", json!({"adresses": ["198.18.1.0/24"]}));
        let services = [svc("s", 1, &[])];
        let plan = pass(&mut r, &[good.clone(), typo.clone()], &services);
        assert_eq!(writes(&plan), [("s".to_string(), vec![ip("198.18.0.0")])]);
        let invalid = plan
            .events
            .iter()
            .find(|e| e.notice.reason == INVALID_POOL)
            .unwrap();
        assert_eq!(invalid.regarding.kind.as_deref(), Some(POOL_KIND));
        assert!(
            invalid.notice.note.contains("unknown field `adresses`")
                && invalid.notice.note.ends_with("the pool is not used"),
            "{}",
            invalid.notice.note
        );
        let b = plan.pool_status.iter().find(|w| w.pool == "b").unwrap();
        assert_eq!(b.condition.status, "False");
        assert_eq!(b.condition.reason, INVALID_POOL);

        // An edit with host bits set: "a" keeps its last valid range, s keeps its address.
        let services = applied(&services, &plan);
        let broken = pool("a", json!({"addresses": ["198.18.0.1/24"]}));
        let plan = pass(&mut r, &[broken, typo], &services);
        assert_eq!(writes(&plan), []);
        let note = &plan.events[0].notice.note;
        assert!(
            note.contains("host bits set") && note.ends_with("stays in use"),
            "{note}"
        );
        assert_eq!(r.allocator().unwrap().pools()[0].name, "a");
    }

    #[test]
    fn services_that_stop_being_ours_release_and_deleted_ones_free() {
        let pools = [pool("p", json!({"addresses": ["198.18.0.0/31"]}))];
        let mut r = Reconciler::new();
        let services = [svc("a", 1, &[]), svc("b", 2, &[])];
        let plan = pass(&mut r, &pools, &services);
        let mut services = applied(&services, &plan);
        services[0].spec.as_mut().unwrap().type_ = Some("ClusterIP".into());
        let plan = pass(&mut r, &pools, &services[..1]);
        assert_eq!(writes(&plan), [("a".to_string(), vec![])]);
        assert_eq!(
            plan.freed,
            [(service_key(&services[1]), vec![ip("198.18.0.1")])]
        );
        assert_eq!(
            plan.events[0].notice.note,
            "Released IP [198.18.0.0]: it is no longer of type LoadBalancer"
        );
        assert!(r.allocator().unwrap().services().next().is_none());
    }
}
