//! LoadBalancer IP address management: address pools and a pure allocator that gives
//! `type: LoadBalancer` Services their addresses, with MetalLB's user experience (same
//! annotations, same defaults), and the controller that runs it against the API: it feeds
//! pools and Services in and writes `status.loadBalancer.ingress` and Events from what comes
//! out. Only `lease`, `events` and `controller` do I/O.
//!
//! - `pool`: the `IPAddressPool` spec and its validation into [`Pool`]s.
//! - `request`: what a Service asks for ([`ServiceRequest`]), read from a `Service` object.
//! - `allocator`: [`Allocator`]: assign, release, restore after a restart, pool updates.
//! - `reconcile`: one controller pass, pure: pools and Services in, status writes and Events
//!   out ([`Reconciler`]).
//! - `lease`: leader election with a `coordination.k8s.io/v1` Lease ([`Elector`] is the pure
//!   state machine, [`LeaseLock`] the I/O).
//! - `events`: Events on Services and pools ([`Recorder`]).
//! - `controller`: the live controller ([`IpamController`]): watches, election, writes.
//!
//! # Pools
//!
//! Pools are cluster-scoped custom resources, `apiVersion: xdp-lb.io/v1alpha1`,
//! `kind: IPAddressPool`:
//!
//! ```yaml
//! apiVersion: xdp-lb.io/v1alpha1
//! kind: IPAddressPool
//! metadata:
//!   name: public
//! spec:
//!   # CIDRs or inclusive first-last ranges, either family (as MetalLB's `addresses`) ...
//!   addresses:
//!     - 198.18.10.0/24
//!     - 198.18.20.10-198.18.20.19
//!   # ... or per family: an entry of the other family here is rejected.
//!   ipv4: [198.18.30.0/28]
//!   ipv6: ["2001:db8:10::/120", "2001:db8:20::1-2001:db8:20::ff"]
//!   autoAssign: true        # default true: Services that name no pool or address use it
//!   avoidBuggyIPs: false    # default false: .0 and .255 are handed out (MetalLB's default)
//!   serviceAllocation:      # default: every Service
//!     namespaces: [dns, web]          # empty: every namespace
//!     serviceSelector:                # a metav1.LabelSelector on the Service's labels
//!       matchLabels: {exposure: public}
//!       matchExpressions:
//!         - {key: tier, operator: In, values: [edge]}
//! ```
//!
//! A pool is rejected (and the others kept) when an entry is not a CIDR or a range, a CIDR has
//! host bits set, a range runs backwards or mixes families, an entry is in the wrong family
//! field, its ranges overlap, its selector is invalid, or it overlaps a valid pool whose name
//! sorts before it. See [`validate_pools`].
//!
//! # Services
//!
//! Every annotation is read under our prefix `xdp-lb.io/` and under MetalLB's
//! `metallb.universe.tf/`; ours wins when both are set:
//!
//! | annotation | meaning |
//! |---|---|
//! | `loadBalancerIPs` | comma-separated addresses, at most one per family (`spec.loadBalancerIP` is the deprecated single-address form) |
//! | `address-pool` | take the addresses from this pool (allowed even if it has `autoAssign: false`) |
//! | `allow-shared-ip` | sharing key: Services with the same key may share an address |
//!
//! # Allocation rules
//!
//! - Deterministic: the lowest free address of the first eligible pool in name order.
//!   Eligible: allowed for the Service, has the family, `autoAssign` (unless named by the
//!   Service). A Service with a sharing key first reuses the lowest address (same pool order)
//!   it may share.
//! - Sharing: Services on one address must all have the same sharing key, no (port, protocol)
//!   in common (TCP and UDP 53 may share) and the same backend identity. The backend identity
//!   is the Service's selector when `externalTrafficPolicy: Local` (the address is only served
//!   where the pods are, so they must be the same pods) and nothing otherwise (every node
//!   serves every backend). This is MetalLB's rule, simplified to "equal selectors".
//! - Families: `SingleStack` gets the first of `spec.ipFamilies` (IPv4 if empty);
//!   `RequireDualStack` gets one of each or nothing; `PreferDualStack` gets one of each family
//!   in `spec.ipFamilies` it can (one family only on a single-stack cluster), at least one.
//!   Addresses come primary family first, as `status.loadBalancer.ingress` lists them.
//! - Stable: an address a Service holds stays while it is still in a pool (and in the pool
//!   the Service names, and compatible with the Services sharing it). Selectors, `autoAssign`
//!   and `avoidBuggyIPs` only govern new allocations; pool updates revoke only the addresses
//!   that left every pool.
//! - Transactional: an [`AllocError`] leaves the allocator unchanged.

pub mod allocator;
pub mod controller;
pub mod events;
pub mod lease;
pub mod pool;
pub mod reconcile;
pub mod request;

use std::{fmt, net::IpAddr};

pub use allocator::{AllocError, Allocator, Revoked};
pub use controller::{IpamController, IpamOptions};
pub use events::{EventSink, EventType, Notice, Recorder, service_reference};
pub use lease::{DEFAULT_LEASE_NAME, Elector, Fence, LeaseAction, LeaseLock, LeaseSettings};
pub use pool::{
    AddrRange, IpAddressPool, IpAddressPoolSpec, LabelSelector, Operator, POOL_API_VERSION,
    POOL_KIND, Pool, PoolAnnounce, PoolAnnounceSpec, PoolBgpSpec, PoolError, Requirement,
    ServiceAllocationSpec, validate_pools,
};
pub use reconcile::{Plan, PoolObject, Reconciler, Snapshot};
pub use request::{
    ANNOTATION_PREFIXES, IpFamilyPolicy, PortSpec, ServiceRequest, ingress_ips, service_key,
};

/// An address family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    pub const fn other(self) -> Self {
        match self {
            Family::V4 => Family::V6,
            Family::V6 => Family::V4,
        }
    }

    pub const fn max_prefix(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }

    /// As in `spec.ipFamilies`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A Service port's protocol. SCTP is listed so that sharing checks see every port, even
/// those the data plane does not forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        })
    }
}

/// A Service's identity: namespace and name.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
}

impl ServiceKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}
