//! The allocator: which Service holds which address. Pure and deterministic; see the module
//! docs of [`crate::ipam`] for the rules.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
};

use super::{
    Family, Protocol, ServiceKey,
    pool::{Pool, is_buggy, next_ip},
    request::{IpFamilyPolicy, PortSpec, ServiceRequest},
};

/// Why a Service got no address (or not the one it asked for). The message is written for a
/// Warning Event on the Service; [`AllocError::reason`] is the Event reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error("{message}")]
    InvalidRequest { message: String },
    #[error("the requested address pool {pool:?} does not exist (or is invalid)")]
    UnknownPool { pool: String },
    #[error(
        "address pool {pool} does not allow this service (check serviceAllocation.namespaces \
         and serviceSelector of the pool)"
    )]
    PoolNotAllowed { pool: String },
    #[error(
        "no address pool can give this service an {family} address (no pool has {family} \
         addresses, autoAssign enabled and a serviceAllocation that admits the service)"
    )]
    NoEligiblePool { family: Family },
    #[error("the requested address pool {pool} has no {family} addresses")]
    PoolLacksFamily { pool: String, family: Family },
    #[error("no free {family} address left in pool{} {}", plural(.pools), .pools.join(", "))]
    PoolExhausted { family: Family, pools: Vec<String> },
    #[error("address {ip} is not in any address pool")]
    NotInAnyPool { ip: IpAddr },
    #[error("address {ip} is not in the requested address pool {pool}")]
    NotInRequestedPool { ip: IpAddr, pool: String },
    #[error("address {ip} of pool {pool} is excluded by avoidBuggyIPs")]
    AddressExcluded { ip: IpAddr, pool: String },
    #[error(
        "address {ip} is already used by service {owner} (services share an address only \
         when they have the same allow-shared-ip key)"
    )]
    AddressInUse { ip: IpAddr, owner: ServiceKey },
    #[error(
        "address {ip} is shared with service {owner}, which already uses port {port}/{protocol}"
    )]
    PortConflict {
        ip: IpAddr,
        owner: ServiceKey,
        port: u16,
        protocol: Protocol,
    },
    #[error(
        "address {ip} is shared with service {owner}, which has other endpoints (services \
         sharing an address with externalTrafficPolicy: Local need the same selector)"
    )]
    BackendMismatch { ip: IpAddr, owner: ServiceKey },
}

fn plural(v: &[String]) -> &'static str {
    if v.len() == 1 { "" } else { "s" }
}

impl AllocError {
    /// CamelCase Event reason.
    pub const fn reason(&self) -> &'static str {
        match self {
            AllocError::InvalidRequest { .. } => "InvalidRequest",
            AllocError::UnknownPool { .. } => "UnknownPool",
            AllocError::PoolNotAllowed { .. } => "PoolNotAllowed",
            AllocError::NoEligiblePool { .. } => "NoEligiblePool",
            AllocError::PoolLacksFamily { .. } => "PoolLacksFamily",
            AllocError::PoolExhausted { .. } => "PoolExhausted",
            AllocError::NotInAnyPool { .. } | AllocError::NotInRequestedPool { .. } => {
                "AddressNotInPool"
            }
            AllocError::AddressExcluded { .. } => "AddressExcluded",
            AllocError::AddressInUse { .. } => "AddressInUse",
            AllocError::PortConflict { .. } => "SharedAddressPortConflict",
            AllocError::BackendMismatch { .. } => "SharedAddressBackendMismatch",
        }
    }
}

/// An address taken from a Service because it is no longer in any pool. The controller
/// emits an Event and removes it from the Service's status.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Revoked {
    pub service: ServiceKey,
    pub ip: IpAddr,
}

impl Revoked {
    pub const REASON: &'static str = "AddressRevoked";
}

impl fmt::Display for Revoked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "address {} is no longer in any address pool and was released",
            self.ip
        )
    }
}

/// What a Service holds, and what is needed to check sharing against it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Holding {
    ips: Vec<IpAddr>,
    sharing_key: Option<String>,
    ports: Vec<PortSpec>,
    backend: Option<String>,
}

impl Holding {
    fn of(req: &ServiceRequest, ips: Vec<IpAddr>) -> Self {
        Self {
            ips,
            sharing_key: req.sharing_key.clone(),
            ports: req.ports.clone(),
            backend: req.backend.clone(),
        }
    }
}

/// Pools plus the current allocations.
#[derive(Clone, Debug, Default)]
pub struct Allocator {
    /// Sorted by name.
    pools: Vec<Pool>,
    services: BTreeMap<ServiceKey, Holding>,
    by_ip: BTreeMap<IpAddr, BTreeSet<ServiceKey>>,
}

impl Allocator {
    /// An allocator over validated pools (see [`super::validate_pools`]), with no allocation.
    pub fn new(mut pools: Vec<Pool>) -> Self {
        pools.sort_by(|a, b| a.name.cmp(&b.name));
        Self {
            pools,
            ..Self::default()
        }
    }

    /// The pools, by name.
    pub fn pools(&self) -> &[Pool] {
        &self.pools
    }

    /// The addresses a Service holds, primary family first.
    pub fn addresses_of(&self, service: &ServiceKey) -> Option<&[IpAddr]> {
        self.services.get(service).map(|h| h.ips.as_slice())
    }

    /// Every Service holding addresses, by name, with its addresses.
    pub fn services(&self) -> impl Iterator<Item = (&ServiceKey, &[IpAddr])> {
        self.services.iter().map(|(k, h)| (k, h.ips.as_slice()))
    }

    /// The Services holding `ip` (more than one only when shared), by name.
    pub fn holders(&self, ip: IpAddr) -> impl Iterator<Item = &ServiceKey> {
        self.by_ip.get(&ip).into_iter().flatten()
    }

    /// Number of distinct addresses in use from pool `name` (for metrics).
    pub fn in_use(&self, name: &str) -> usize {
        let Some(pool) = self.pools.iter().find(|p| p.name == name) else {
            return 0;
        };
        self.by_ip.keys().filter(|ip| pool.in_range(**ip)).count()
    }

    /// Give a Service its addresses, or confirm the ones it holds: an address it holds stays
    /// while it is still valid for the request. Returns the Service's addresses, primary
    /// family first. On error nothing changes (the Service keeps what it held).
    pub fn assign(&mut self, req: &ServiceRequest) -> Result<Vec<IpAddr>, AllocError> {
        let ips = if req.requested_ips.is_empty() {
            self.plan_auto(req)?
        } else {
            self.plan_requested(req)?
        };
        self.commit(req, ips.clone());
        Ok(ips)
    }

    /// Forget a Service's allocation; returns the addresses it held.
    pub fn release(&mut self, service: &ServiceKey) -> Vec<IpAddr> {
        let Some(holding) = self.services.remove(service) else {
            return Vec::new();
        };
        for ip in &holding.ips {
            self.unhold(*ip, service);
        }
        holding.ips
    }

    /// Rebuild a Service's allocation from the addresses in its status (after a restart),
    /// without moving anything: every address that is in a pool and compatible with the
    /// Services already restored is recorded as it is (selectors, `autoAssign`, requested
    /// pool and address are not checked, as for any address a Service holds). The others
    /// are returned; the controller reports them and calls [`Allocator::assign`]. Restore the
    /// oldest Services first: on a conflict the one restored first keeps the address.
    #[must_use = "rejected addresses must be reported"]
    pub fn restore(&mut self, req: &ServiceRequest, ips: &[IpAddr]) -> Vec<AllocError> {
        let mut kept: Vec<IpAddr> = Vec::new();
        let mut rejected = Vec::new();
        for &ip in ips {
            if kept.contains(&ip) {
                continue;
            }
            if let Some(other) = kept.iter().find(|k| Family::of(**k) == Family::of(ip)) {
                rejected.push(AllocError::InvalidRequest {
                    message: format!(
                        "status holds two {} addresses ({other} and {ip}); {ip} is dropped",
                        Family::of(ip)
                    ),
                });
                continue;
            }
            let check = match self.pool_in_range(ip) {
                None => Err(AllocError::NotInAnyPool { ip }),
                Some(_) => self.check_sharing(ip, req),
            };
            match check {
                Ok(()) => kept.push(ip),
                Err(e) => rejected.push(e),
            }
        }
        order_by_family(&mut kept, req);
        self.commit(req, kept);
        rejected
    }

    /// Replace the pools. Nothing moves: an address stays with its Services while it is in
    /// any pool (even if the pool no longer admits them). Addresses outside every pool are
    /// released and returned, by Service; a Service left with no address is forgotten.
    pub fn update_pools(&mut self, mut pools: Vec<Pool>) -> Vec<Revoked> {
        pools.sort_by(|a, b| a.name.cmp(&b.name));
        self.pools = pools;
        let gone: Vec<IpAddr> = self
            .by_ip
            .keys()
            .copied()
            .filter(|ip| self.pool_in_range(*ip).is_none())
            .collect();
        let mut revoked = Vec::new();
        for ip in gone {
            for service in self.by_ip.remove(&ip).unwrap_or_default() {
                if let Some(h) = self.services.get_mut(&service) {
                    h.ips.retain(|i| *i != ip);
                    if h.ips.is_empty() {
                        self.services.remove(&service);
                    }
                }
                revoked.push(Revoked { service, ip });
            }
        }
        revoked.sort();
        revoked
    }

    fn commit(&mut self, req: &ServiceRequest, ips: Vec<IpAddr>) {
        let key = &req.key;
        if let Some(old) = self.services.remove(key) {
            for ip in old.ips {
                self.unhold(ip, key);
            }
        }
        if ips.is_empty() {
            return;
        }
        for ip in &ips {
            self.by_ip.entry(*ip).or_default().insert(key.clone());
        }
        self.services.insert(key.clone(), Holding::of(req, ips));
    }

    fn unhold(&mut self, ip: IpAddr, service: &ServiceKey) {
        if let Some(holders) = self.by_ip.get_mut(&ip) {
            holders.remove(service);
            if holders.is_empty() {
                self.by_ip.remove(&ip);
            }
        }
    }

    fn pool_in_range(&self, ip: IpAddr) -> Option<&Pool> {
        self.pools.iter().find(|p| p.in_range(ip))
    }

    fn requested_pool(&self, req: &ServiceRequest) -> Result<Option<&Pool>, AllocError> {
        match &req.pool {
            None => Ok(None),
            Some(name) => self
                .pools
                .iter()
                .find(|p| &p.name == name)
                .map(Some)
                .ok_or_else(|| AllocError::UnknownPool { pool: name.clone() }),
        }
    }

    /// Services other than `req`'s holding `ip`.
    fn others(&self, ip: IpAddr, req: &ServiceRequest) -> impl Iterator<Item = &ServiceKey> {
        self.holders(ip).filter(move |k| **k != req.key)
    }

    /// May `req` use `ip` alongside the Services already on it?
    fn check_sharing(&self, ip: IpAddr, req: &ServiceRequest) -> Result<(), AllocError> {
        for owner in self.others(ip, req) {
            let h = &self.services[owner];
            if req.sharing_key.is_none() || h.sharing_key != req.sharing_key {
                return Err(AllocError::AddressInUse {
                    ip,
                    owner: owner.clone(),
                });
            }
            if h.backend != req.backend {
                return Err(AllocError::BackendMismatch {
                    ip,
                    owner: owner.clone(),
                });
            }
            if let Some(p) = req.ports.iter().find(|p| h.ports.contains(p)) {
                return Err(AllocError::PortConflict {
                    ip,
                    owner: owner.clone(),
                    port: p.port,
                    protocol: p.protocol,
                });
            }
        }
        Ok(())
    }

    /// The families the request wants, in order. `PreferDualStack` follows `spec.ipFamilies`
    /// (the API server lists only the cluster's families there), or both when it is empty.
    fn wanted_families(req: &ServiceRequest) -> Vec<Family> {
        let primary = req.primary_family();
        match (req.ip_family_policy, req.ip_families.len()) {
            (IpFamilyPolicy::SingleStack, _) | (IpFamilyPolicy::PreferDualStack, 1) => {
                vec![primary]
            }
            _ => vec![primary, primary.other()],
        }
    }

    fn plan_requested(&self, req: &ServiceRequest) -> Result<Vec<IpAddr>, AllocError> {
        let invalid = |message: String| AllocError::InvalidRequest { message };
        let mut ips = req.requested_ips.clone();
        ips.dedup();
        for (i, a) in ips.iter().enumerate() {
            if let Some(b) = ips[i + 1..]
                .iter()
                .find(|b| Family::of(**b) == Family::of(*a))
            {
                return Err(invalid(format!(
                    "requested addresses {a} and {b} are both {}; request at most one per family",
                    Family::of(*a)
                )));
            }
        }
        match req.ip_family_policy {
            IpFamilyPolicy::SingleStack => {
                if ips.len() > 1 {
                    return Err(invalid(
                        "two addresses requested for a SingleStack service".into(),
                    ));
                }
                if !req.ip_families.is_empty() && Family::of(ips[0]) != req.primary_family() {
                    return Err(invalid(format!(
                        "requested address {} is {} but the service is single-stack {}",
                        ips[0],
                        Family::of(ips[0]),
                        req.primary_family()
                    )));
                }
            }
            IpFamilyPolicy::RequireDualStack if ips.len() < 2 => {
                return Err(invalid(
                    "RequireDualStack needs one requested address per family".into(),
                ));
            }
            _ => {}
        }
        let requested_pool = self.requested_pool(req)?;
        let held = self.addresses_of(&req.key).unwrap_or_default();
        for &ip in &ips {
            let pool = self
                .pool_in_range(ip)
                .ok_or(AllocError::NotInAnyPool { ip })?;
            if let Some(want) = requested_pool
                && want.name != pool.name
            {
                return Err(AllocError::NotInRequestedPool {
                    ip,
                    pool: want.name.clone(),
                });
            }
            // An address the Service already holds stays even if the pool changed since.
            if !held.contains(&ip) {
                if !pool.usable(ip) {
                    return Err(AllocError::AddressExcluded {
                        ip,
                        pool: pool.name.clone(),
                    });
                }
                if !pool.allows(&req.key.namespace, &req.labels) {
                    return Err(AllocError::PoolNotAllowed {
                        pool: pool.name.clone(),
                    });
                }
            }
            self.check_sharing(ip, req)?;
        }
        order_by_family(&mut ips, req);
        Ok(ips)
    }

    fn plan_auto(&self, req: &ServiceRequest) -> Result<Vec<IpAddr>, AllocError> {
        let requested_pool = self.requested_pool(req)?;
        let held = self.addresses_of(&req.key).unwrap_or_default();
        let mut ips = Vec::new();
        let mut first_err = None;
        for family in Self::wanted_families(req) {
            let kept = held.iter().copied().find(|&ip| {
                Family::of(ip) == family
                    && self
                        .pool_in_range(ip)
                        .is_some_and(|p| requested_pool.is_none_or(|want| want.name == p.name))
                    && self.check_sharing(ip, req).is_ok()
            });
            let got = match kept {
                Some(ip) => Ok(ip),
                None => self.pick(req, requested_pool, family),
            };
            match got {
                Ok(ip) => ips.push(ip),
                Err(e) if req.ip_family_policy == IpFamilyPolicy::PreferDualStack => {
                    first_err.get_or_insert(e);
                }
                Err(e) => return Err(e),
            }
        }
        match first_err {
            Some(e) if ips.is_empty() => Err(e),
            _ => Ok(ips),
        }
    }

    /// A new address of `family` for `req`.
    fn pick(
        &self,
        req: &ServiceRequest,
        requested_pool: Option<&Pool>,
        family: Family,
    ) -> Result<IpAddr, AllocError> {
        let candidates: Vec<&Pool> = match requested_pool {
            Some(pool) => {
                if !pool.allows(&req.key.namespace, &req.labels) {
                    return Err(AllocError::PoolNotAllowed {
                        pool: pool.name.clone(),
                    });
                }
                if !pool.has_family(family) {
                    return Err(AllocError::PoolLacksFamily {
                        pool: pool.name.clone(),
                        family,
                    });
                }
                vec![pool]
            }
            None => self
                .pools
                .iter()
                .filter(|p| {
                    p.auto_assign
                        && p.has_family(family)
                        && p.allows(&req.key.namespace, &req.labels)
                })
                .collect(),
        };
        if candidates.is_empty() {
            return Err(AllocError::NoEligiblePool { family });
        }
        // A Service with a sharing key joins the first address it may share.
        if req.sharing_key.is_some() {
            for pool in &candidates {
                let shared = self.by_ip.keys().copied().find(|&ip| {
                    Family::of(ip) == family
                        && pool.usable(ip)
                        && self.others(ip, req).next().is_some()
                        && self.check_sharing(ip, req).is_ok()
                });
                if let Some(ip) = shared {
                    return Ok(ip);
                }
            }
        }
        for pool in &candidates {
            if let Some(ip) = self.lowest_free(pool, family, req) {
                return Ok(ip);
            }
        }
        Err(AllocError::PoolExhausted {
            family,
            pools: candidates.iter().map(|p| p.name.clone()).collect(),
        })
    }

    /// The lowest address of `family` in `pool` that no other Service holds. The scan skips
    /// held addresses one by one, so its cost is bounded by the number of allocations.
    fn lowest_free(&self, pool: &Pool, family: Family, req: &ServiceRequest) -> Option<IpAddr> {
        for range in pool.ranges.iter().filter(|r| r.family() == family) {
            let mut ip = range.first();
            loop {
                let excluded = pool.avoid_buggy_ips && is_buggy(ip);
                if !excluded && self.others(ip, req).next().is_none() {
                    return Some(ip);
                }
                match next_ip(ip) {
                    Some(next) if next <= range.last() => ip = next,
                    _ => break,
                }
            }
        }
        None
    }
}

/// Primary family first.
fn order_by_family(ips: &mut [IpAddr], req: &ServiceRequest) {
    let primary = req.primary_family();
    ips.sort_by_key(|ip| Family::of(*ip) != primary);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::AddrRange;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn pool(name: &str, ranges: &[&str]) -> Pool {
        Pool::new(name, ranges.iter().map(|r| AddrRange::parse(r).unwrap()))
    }

    #[test]
    fn lowest_free_in_first_pool_by_name() {
        // Given in reverse order; "a" still comes first.
        let mut a = Allocator::new(vec![
            pool("b", &["198.18.0.0/31"]),
            pool("a", &["198.18.1.4-198.18.1.5", "198.18.1.0/31"]),
        ]);
        let got: Vec<IpAddr> = (0..6)
            .map(|i| {
                a.assign(&ServiceRequest::new("ns", format!("s{i}")))
                    .unwrap()[0]
            })
            .collect();
        assert_eq!(
            got,
            [
                "198.18.1.0",
                "198.18.1.1",
                "198.18.1.4",
                "198.18.1.5",
                "198.18.0.0",
                "198.18.0.1"
            ]
            .map(ip)
        );
        let e = a.assign(&ServiceRequest::new("ns", "s6")).unwrap_err();
        assert_eq!(e.to_string(), "no free IPv4 address left in pools a, b");
        assert_eq!(e.reason(), "PoolExhausted");
        assert_eq!(a.in_use("a"), 4);
    }

    #[test]
    fn assign_is_idempotent_and_release_frees() {
        let mut a = Allocator::new(vec![pool("p", &["198.18.0.0/30"])]);
        let s = ServiceRequest::new("ns", "s");
        let first = a.assign(&s).unwrap();
        assert_eq!(a.assign(&s).unwrap(), first);
        assert_eq!(a.release(&s.key), first);
        assert!(a.release(&s.key).is_empty());
        assert_eq!(a.holders(first[0]).count(), 0);
    }

    #[test]
    fn errors_leave_state_unchanged() {
        let mut a = Allocator::new(vec![pool("p", &["198.18.0.0/30"])]);
        let mut s = ServiceRequest::new("ns", "s");
        let held = a.assign(&s).unwrap();
        s.requested_ips = vec![ip("198.18.9.9")];
        assert_eq!(
            a.assign(&s).unwrap_err(),
            AllocError::NotInAnyPool {
                ip: ip("198.18.9.9")
            }
        );
        assert_eq!(a.addresses_of(&s.key), Some(held.as_slice()));
    }

    #[test]
    fn plural_in_exhaustion_message() {
        let e = AllocError::PoolExhausted {
            family: Family::V6,
            pools: vec!["only".into()],
        };
        assert_eq!(e.to_string(), "no free IPv6 address left in pool only");
    }
}
