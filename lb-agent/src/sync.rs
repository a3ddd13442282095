//! The pure part of applying a desired state: compare it with what the maps hold and produce
//! the ordered list of map writes that turns one into the other. Nothing is flushed; what is
//! already right is not written again.
//!
//! Order of operations (so no packet ever sees a dangling reference):
//! 1. node config; new entries of the decap allow lists; new or changed backends;
//! 2. new Maglev tables, each in a free region of `LB_MAGLEV`;
//! 3. service entries switched to their new tables (one atomic hash-map update each), and
//!    the service index: each changed service's record written into its idle bank, then its
//!    slot pointed at it (one 4-byte write), or marked shared;
//! 4. slots of removed services cleared, then their entries deleted; backends no service
//!    uses any more cleared; decap allow-list entries no longer wanted removed last.
//!
//! A region left behind by step 3 is free from the next plan on: it is derived from the
//! service entries, never stored separately.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use lb_common::{
    BACKEND_F_LOCAL, BACKEND_F_NO_NEIGH, BACKEND_F_UNREACHABLE, BACKEND_F_VALID,
    BACKEND_F_VIA_NODE, BackendValue, DecapAddr, DnatKey, DnatValue, FAMILY_V4, FAMILY_V6,
    Forwarding, NodeConfig, SERVICE_F_AFFINITY, SERVICE_F_FLOW_TRACKING, SERVICE_F_SOURCE_RANGES,
    SLOT_EMPTY, SLOT_SHARED, ServiceKey, ServiceRecord, ServiceValue, SourceRange, VIP_F_ANSWER,
    VIP_F_ECHO, VipKey, VipValue,
    maglev::{self, MaglevBackend},
    maps::{MAX_BACKENDS, MAX_SERVICES},
};

use crate::{
    loader::Loaded,
    state::{DesiredState, LocalEndpoint, Protocol, ServiceAddr},
    table_cache::{Lookup, TableCache},
};

mod alloc;
mod existing;
#[cfg(test)]
mod model_tests;

use alloc::{IdPool, Regions};
use existing::Existing;

/// What the pinned maps hold now (only valid backends).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapSnapshot {
    pub config: Option<NodeConfig>,
    /// The flow tables' secret in `LB_CONFIG`, also before a valid config was written
    /// (drawn at load time: `flowtab::ensure_secret`).
    pub flow_secret: [u64; 4],
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub backends: BTreeMap<u32, BackendValue>,
    pub vips: BTreeMap<VipKey, VipValue>,
    /// `LB_SRC_RANGES` entries: (prefix length, key data).
    pub source_ranges: BTreeSet<(u32, SourceRange)>,
    /// Slots in `LB_MAGLEV`.
    pub maglev_capacity: u32,
    /// `LB_DNAT`: this node's endpoints.
    pub dnat: BTreeMap<DnatKey, DnatValue>,
    /// `LB_SVC_SLOTS`: the slots that are not empty.
    pub service_slots: BTreeMap<u32, u32>,
    /// `LB_SVC_RECORDS`: the records those slots point at (the others are unreachable).
    pub service_records: BTreeMap<u32, ServiceRecord>,
    /// `LB_DECAP_SRC` entries.
    pub decap_sources: DecapEntries,
    /// `LB_DECAP_DST` entries.
    pub decap_destinations: DecapEntries,
}

/// Entries of a decap allow list: (prefix length, key data).
pub type DecapEntries = BTreeSet<(u32, DecapAddr)>;

/// Which of the decap program's allow lists an entry belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecapList {
    /// `LB_DECAP_SRC`: outer sources.
    Sources,
    /// `LB_DECAP_DST`: outer destinations.
    Destinations,
}

/// One write to the maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapOp {
    SetConfig(NodeConfig),
    SetVip {
        key: VipKey,
        value: VipValue,
    },
    DeleteVip {
        key: VipKey,
    },
    AddSourceRange {
        prefix_len: u32,
        range: SourceRange,
    },
    RemoveSourceRange {
        prefix_len: u32,
        range: SourceRange,
    },
    /// `fresh`: the id was free before, so its counters start from zero.
    SetBackend {
        id: u32,
        value: BackendValue,
        fresh: bool,
    },
    WriteTable {
        offset: u32,
        entries: Vec<u32>,
    },
    SetService {
        key: ServiceKey,
        value: ServiceValue,
        fresh: bool,
        name: String,
    },
    DeleteService {
        key: ServiceKey,
    },
    ClearBackend {
        id: u32,
    },
    SetDnat {
        key: DnatKey,
        value: DnatValue,
    },
    DeleteDnat {
        key: DnatKey,
    },
    /// Record `index` of `LB_SVC_RECORDS` (no slot points at it yet).
    SetServiceRecord {
        index: u32,
        record: ServiceRecord,
    },
    /// Slot `slot` of `LB_SVC_SLOTS`.
    SetServiceSlot {
        slot: u32,
        value: u32,
    },
    /// An entry of `LB_DECAP_SRC` / `LB_DECAP_DST` (`decap_prefix`).
    AddDecap {
        list: DecapList,
        prefix_len: u32,
        addr: DecapAddr,
    },
    RemoveDecap {
        list: DecapList,
        prefix_len: u32,
        addr: DecapAddr,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error(
        "service {service} ({addr}): Maglev table of {size} slots does not fit in LB_MAGLEV ({capacity} slots, {free} free)"
    )]
    MaglevFull {
        service: String,
        addr: ServiceAddr,
        size: u32,
        capacity: u32,
        free: u32,
    },
    #[error("too many services: {count} (at most {max})")]
    TooManyServices { count: usize, max: u32 },
    #[error("too many backends: {count} (at most {max})")]
    TooManyBackends { count: usize, max: u32 },
    #[error("service {service} ({addr}): {error}")]
    Maglev {
        service: String,
        addr: ServiceAddr,
        error: String,
    },
}

/// Result of planning.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub ops: Vec<MapOp>,
    /// Backends whose next-hop MAC address is not known yet. They are in their tables like
    /// any other (`BACKEND_F_NO_NEIGH`): the data plane drops their new flows until the MAC
    /// is known, and then one backend write brings them in.
    pub unresolved: Vec<(ServiceAddr, IpAddr)>,
    /// Backends whose next hop failed to resolve (`BACKEND_F_UNREACHABLE`): in their tables
    /// too, passed over by the data plane, which sends their share to the backends of the
    /// following slots.
    pub unreachable: Vec<(ServiceAddr, IpAddr)>,
}

/// What the agent knows of the backends' next hops: the resolved MAC of each backend
/// address, and the addresses whose next hop failed to resolve (the kernel's neighbour
/// entry is FAILED). An address in neither is still being resolved.
#[derive(Clone, Copy, Debug)]
pub struct NextHops<'a> {
    pub macs: &'a BTreeMap<IpAddr, [u8; 6]>,
    pub failed: &'a BTreeSet<IpAddr>,
}

/// The node a backend (a pod) of a tunnelling service is reached through, if any:
/// `pod_nodes`, of its family. `l2` forwarding sends frames to the backend itself.
pub fn via_node<'a>(
    desired: &'a DesiredState,
    forwarding: Forwarding,
    backend: &IpAddr,
) -> Option<&'a IpAddr> {
    if forwarding == Forwarding::L2 {
        return None;
    }
    desired
        .pod_nodes
        .get(backend)
        .filter(|n| n.is_ipv6() == backend.is_ipv6())
}

/// The address whose neighbour entry a backend's frames go by: its node's, or its own (the
/// kernel's route lookup then finds the gateway, if any).
pub fn next_hop_target(desired: &DesiredState, forwarding: Forwarding, backend: &IpAddr) -> IpAddr {
    via_node(desired, forwarding, backend)
        .copied()
        .unwrap_or(*backend)
}

/// How a backend's next hop stands, for its entry.
fn next_hop_flags(
    hops: NextHops<'_>,
    ip: &IpAddr,
    configured: Option<[u8; 6]>,
    current: Option<&BackendValue>,
) -> ([u8; 6], u8) {
    if let Some(mac) = configured.or_else(|| hops.macs.get(ip).copied()) {
        return (mac, 0);
    }
    if hops.failed.contains(ip) {
        return ([0; 6], BACKEND_F_UNREACHABLE);
    }
    match current {
        // Still being resolved again (an entry the kernel dropped, or one re-probed after
        // failing): the entry stays as it is, so a live backend keeps its MAC and a gone one
        // stays passed over, until the kernel has an answer.
        Some(v) if v.flags & BACKEND_F_LOCAL == 0 && v.can_take() => (v.mac, 0),
        Some(v) if v.is_unreachable() => ([0; 6], BACKEND_F_UNREACHABLE),
        _ => ([0; 6], BACKEND_F_NO_NEIGH),
    }
}

/// Map key of a service.
pub fn service_key(addr: &ServiceAddr) -> ServiceKey {
    let (addr_be, family) = ip_bytes(addr.vip);
    ServiceKey {
        addr_be,
        port_be: addr.port.to_be(),
        proto: addr.protocol.number(),
        family,
    }
}

/// The inverse of [`service_key`]; `None` for keys this agent would never write.
pub fn service_addr(key: &ServiceKey) -> Option<ServiceAddr> {
    Some(ServiceAddr {
        vip: ip_from_bytes(&key.addr_be, key.family)?,
        port: u16::from_be(key.port_be),
        protocol: Protocol::from_number(key.proto)?,
    })
}

pub fn ip_bytes(ip: IpAddr) -> ([u8; 16], u8) {
    let mut out = [0u8; 16];
    match ip {
        IpAddr::V4(a) => {
            out[..4].copy_from_slice(&a.octets());
            (out, FAMILY_V4)
        }
        IpAddr::V6(a) => (a.octets(), FAMILY_V6),
    }
}

pub fn ip_from_bytes(bytes: &[u8; 16], family: u8) -> Option<IpAddr> {
    match family {
        FAMILY_V4 => Some(IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]])),
        FAMILY_V6 => Some(IpAddr::from(*bytes)),
        _ => None,
    }
}

fn maglev_key(ip: IpAddr) -> [u8; 17] {
    let (bytes, family) = ip_bytes(ip);
    let mut key = [0u8; 17];
    key[..16].copy_from_slice(&bytes);
    key[16] = family;
    key
}

/// The `LB_SRC_RANGES` entry allowing `net` for service `id`.
pub fn source_range(id: u32, net: &ipnet::IpNet) -> (u32, SourceRange) {
    let (addr_be, _) = ip_bytes(net.network());
    (
        32 + u32::from(net.prefix_len()),
        SourceRange {
            service_id_be: id.to_be_bytes(),
            addr_be,
        },
    )
}

/// The `LB_DECAP_SRC` / `LB_DECAP_DST` entry for `net`.
pub fn decap_prefix(net: &ipnet::IpNet) -> (u32, DecapAddr) {
    let (addr_be, family) = ip_bytes(net.network());
    (
        DecapAddr::FAMILY_BITS + u32::from(net.prefix_len()),
        DecapAddr::new(addr_be, family),
    )
}

/// The decap program's allow lists, (sources, destinations), for `desired` with the resolved
/// `node` config. Sources: `decap_sources` and the node's own encapsulation sources (`lb_xdp`
/// tunnels packets for local backends from them). Destinations: the node's addresses, its
/// encapsulation sources and its local endpoints (other nodes tunnel to a pod's address).
/// Both empty unless the node decapsulates.
pub fn decap_entries(desired: &DesiredState, node: &NodeConfig) -> (DecapEntries, DecapEntries) {
    if !desired.node.decap {
        return Default::default();
    }
    let encap: Vec<IpAddr> = [
        (node.encap_src_v4_be != [0; 4]).then(|| IpAddr::from(node.encap_src_v4_be)),
        (node.encap_src_v6_be != [0; 16]).then(|| IpAddr::from(node.encap_src_v6_be)),
    ]
    .into_iter()
    .flatten()
    .collect();
    let host = |ip: &IpAddr| decap_prefix(&ipnet::IpNet::from(*ip));
    let mut sources: BTreeSet<_> = desired.decap_sources.iter().map(decap_prefix).collect();
    sources.extend(encap.iter().map(host));
    let mut destinations: BTreeSet<_> = desired.node_addresses.iter().map(host).collect();
    destinations.extend(encap.iter().map(host));
    destinations.extend(desired.local_endpoints.keys().map(|e| host(&e.backend)));
    (sources, destinations)
}

/// Add service `addr`'s VIP to `vips`, and make it the VIP's fragment service if it is one.
fn add_vip(vips: &mut BTreeMap<VipKey, VipValue>, addr: &ServiceAddr, fragments: bool, flags: u32) {
    let (addr_be, family) = ip_bytes(addr.vip);
    let v = vips
        .entry(VipKey::new(addr_be, family))
        .or_insert(VipValue {
            flags,
            frag_port_udp_be: 0,
            frag_port_tcp_be: 0,
        });
    if fragments {
        match addr.protocol {
            Protocol::Udp => v.frag_port_udp_be = addr.port.to_be(),
            Protocol::Tcp => v.frag_port_tcp_be = addr.port.to_be(),
        }
    }
}

/// The node config the data plane gets: interface MAC and encapsulation sources as
/// resolved (unspecified: the data plane drops what would need it), what the data plane
/// is as loaded (tick rate, flow-table buckets), the rest from the desired state.
pub fn node_config(
    desired: &DesiredState,
    mac: [u8; 6],
    encap_v4: Option<std::net::Ipv4Addr>,
    encap_v6: Option<std::net::Ipv6Addr>,
    loaded: Loaded,
) -> NodeConfig {
    let f = desired.node.flows;
    NodeConfig {
        mac,
        hz: loaded.hz,
        encap_src_v4_be: encap_v4.map_or([0; 4], |a| a.octets()),
        flags: lb_common::CONFIG_F_VALID
            | if desired.node.pmtu_icmp {
                lb_common::CONFIG_F_PMTU_ICMP
            } else {
                0
            }
            | if desired.node.decap {
                lb_common::CONFIG_F_DECAP
            } else {
                0
            },
        tcp_idle_s: f.tcp_idle_s,
        udp_idle_s: f.udp_idle_s,
        new_flows_per_cpu_s: f.new_flows_per_cpu_s,
        gue_port_be: desired.node.gue_port.to_be(),
        // Set from the interface by the caller; 0 disables the MTU check.
        mtu: 0,
        encap_src_v6_be: encap_v6.map_or([0; 16], |a| a.octets()),
        flow_buckets4: loaded.flow_buckets4,
        flow_buckets6: loaded.flow_buckets6,
        // The node's own, which the maps keep (see `plan`).
        flow_secret: [0; 4],
    }
}

/// Compute the writes that make `current` hold `desired`. `node` is the resolved node config,
/// `macs` the resolved next-hop MAC of each backend address (missing: the entry says so,
/// `BACKEND_F_NO_NEIGH`, and the data plane drops what would go to it; see
/// [`plan_with_hops`] for next hops that failed).
///
/// The tables depend on the backend set alone, never on which MACs are known, so every node
/// builds the same ones: a flow lands on the same backend whichever node it reaches.
///
/// Backend entries belong to one service each: a flow remembered for a service is only
/// followed to an entry of that same service, so removing an address from one service
/// reroutes exactly that service's flows to it.
pub fn plan(
    desired: &DesiredState,
    node: NodeConfig,
    macs: &BTreeMap<IpAddr, [u8; 6]>,
    current: &MapSnapshot,
) -> Result<Plan, PlanError> {
    plan_with_cache(desired, node, macs, current, &mut TableCache::default())
}

/// [`plan`], with Maglev fingerprints remembered in `tables` across calls: the result is the
/// same as [`plan`]'s, but only the tables whose inputs changed since the previous call are
/// built. Keep one `TableCache` for the agent's life: it depends on nothing the maps hold, so
/// it stays correct when the snapshot is read again.
pub fn plan_with_cache(
    desired: &DesiredState,
    node: NodeConfig,
    macs: &BTreeMap<IpAddr, [u8; 6]>,
    current: &MapSnapshot,
    tables: &mut TableCache,
) -> Result<Plan, PlanError> {
    let failed = BTreeSet::new();
    let hops = NextHops {
        macs,
        failed: &failed,
    };
    plan_with_hops(desired, node, hops, current, tables)
}

/// [`plan_with_cache`] with all the agent knows of next hops: a backend whose next hop
/// failed is marked `BACKEND_F_UNREACHABLE` (the data plane passes it over); one whose next
/// hop is being resolved again keeps the entry it has.
pub fn plan_with_hops(
    desired: &DesiredState,
    node: NodeConfig,
    hops: NextHops<'_>,
    current: &MapSnapshot,
    tables: &mut TableCache,
) -> Result<Plan, PlanError> {
    if desired.services.len() > MAX_SERVICES as usize {
        return Err(PlanError::TooManyServices {
            count: desired.services.len(),
            max: MAX_SERVICES,
        });
    }
    let mut out = Plan::default();
    // The flow tables' secret is the node's, drawn once (`Dataplane::from_ebpf`) and kept:
    // a config without one keeps the one the maps hold.
    let node = if node.flow_secret == [0; 4] {
        NodeConfig {
            flow_secret: current
                .config
                .map_or(current.flow_secret, |c| c.flow_secret),
            ..node
        }
    } else {
        node
    };
    if current.config != Some(node) {
        out.ops.push(MapOp::SetConfig(node));
    }
    // Decap allow lists: a sender or destination is allowed before traffic needs it, and
    // removed last.
    let (decap_src, decap_dst) = decap_entries(desired, &node);
    let decap_lists = [
        (DecapList::Sources, &decap_src, &current.decap_sources),
        (
            DecapList::Destinations,
            &decap_dst,
            &current.decap_destinations,
        ),
    ];
    for (list, want, have) in decap_lists {
        for (prefix_len, addr) in want.difference(have) {
            out.ops.push(MapOp::AddDecap {
                list,
                prefix_len: *prefix_len,
                addr: *addr,
            });
        }
    }
    // Local endpoints: translations exist before any packet is sent to them.
    let dnat = dnat_entries(desired);
    for (key, value) in &dnat {
        if current.dnat.get(key) != Some(value) {
            out.ops.push(MapOp::SetDnat {
                key: *key,
                value: *value,
            });
        }
    }

    // VIPs (for ICMP echo): added first, removed last.
    let vip_flags = if desired.node.icmp_echo {
        VIP_F_ECHO
    } else {
        0
    };
    let mut vips: BTreeMap<VipKey, VipValue> = BTreeMap::new();

    // One pass over the desired services, in order. Each keeps its id (new ones get the
    // lowest free); its backends are matched against the entries the maps hold for that id,
    // and its table is looked up in `tables` (built only when its inputs changed).
    tables.begin();
    let mut service_pool = IdPool::new(MAX_SERVICES, current.services.values().map(|v| v.id));
    let mut backend_pool = IdPool::new(MAX_BACKENDS, []);
    let mut existing = Existing::new(&current.backends, &mut backend_pool);
    let mut regions: Option<Regions> = None;
    let mut ranges: BTreeSet<(u32, SourceRange)> = BTreeSet::new();
    let mut backend_ops = Vec::new();
    let mut table_ops = Vec::new();
    let mut service_ops = Vec::new();
    let mut members: Vec<MaglevBackend> = Vec::new();
    // (slot, key, value) of every desired service, for the index.
    let mut indexed: Vec<(u32, ServiceKey, ServiceValue)> =
        Vec::with_capacity(desired.services.len());
    // Desired services already in the maps: when that is all of them, none is deleted.
    let mut kept_services = 0usize;
    for (addr, svc) in &desired.services {
        let owned = if desired.l2_owned.contains(&addr.vip) {
            VIP_F_ANSWER
        } else {
            0
        };
        add_vip(&mut vips, addr, svc.fragments, vip_flags | owned);
        let key = service_key(addr);
        let old = current.services.get(&key);
        let (id, fresh) = match old {
            Some(v) => {
                kept_services += 1;
                (v.id, false)
            }
            None => {
                let id = service_pool.take().ok_or(PlanError::TooManyServices {
                    count: desired.services.len(),
                    max: MAX_SERVICES,
                })?;
                (id, true)
            }
        };

        // Backend entries: one per (service, address), all of them in the table.
        members.clear();
        let mut cursor = existing.cursor(id);
        for (ip, spec) in &svc.backends {
            let found = existing.find(&mut cursor, *ip);
            // A local endpoint never leaves the node: its frames are addressed to the node.
            let local = desired.local_endpoints.contains_key(&LocalEndpoint {
                service: *addr,
                backend: *ip,
            });
            // A pod behind its node: the tunnel, and so the next hop, is the node's.
            let via = if local {
                None
            } else {
                via_node(desired, svc.forwarding, ip)
            };
            let (mac, neigh) = if local {
                (node.mac, 0)
            } else {
                let hop = via.unwrap_or(ip);
                next_hop_flags(hops, hop, spec.mac, found.as_ref().map(|f| f.value))
            };
            if neigh & BACKEND_F_NO_NEIGH != 0 {
                out.unresolved.push((*addr, *ip));
            } else if neigh & BACKEND_F_UNREACHABLE != 0 {
                out.unreachable.push((*addr, *ip));
            }
            let (addr_be, family) = ip_bytes(*ip);
            let (via_be, via_flag) = match via {
                Some(n) => (ip_bytes(*n).0, BACKEND_F_VIA_NODE),
                None => ([0; 16], 0),
            };
            let value = BackendValue {
                addr_be,
                mac,
                family,
                flags: BACKEND_F_VALID | neigh | via_flag | if local { BACKEND_F_LOCAL } else { 0 },
                service_id: id,
                _pad: [0; 4],
                via_be,
            };
            let backend_id = match found {
                Some(f) => {
                    existing.keep(&f);
                    if *f.value != value {
                        backend_ops.push(MapOp::SetBackend {
                            id: f.id,
                            value,
                            fresh: false,
                        });
                    }
                    f.id
                }
                None => {
                    let backend_id = backend_pool.take().ok_or(PlanError::TooManyBackends {
                        count: backend_pool.count() + 1,
                        max: MAX_BACKENDS,
                    })?;
                    backend_ops.push(MapOp::SetBackend {
                        id: backend_id,
                        value,
                        fresh: true,
                    });
                    backend_id
                }
            };
            members.push(MaglevBackend {
                key: maglev_key(*ip),
                id: backend_id,
                weight: spec.weight,
            });
        }

        // Allow lists: entries exist before a service's flag turns them on, and go after.
        ranges.extend(
            svc.source_ranges
                .iter()
                .flatten()
                .map(|net| source_range(id, net)),
        );

        // The table, and the service entry.
        let total: u64 = members.iter().map(|m| u64::from(m.weight)).sum();
        let size = if members.is_empty() {
            0
        } else {
            svc.table_size
                .unwrap_or_else(|| maglev::table_size_for(total))
        };
        let maglev_err = |e: maglev::MaglevError| PlanError::Maglev {
            service: svc.name.clone(),
            addr: *addr,
            error: e.to_string(),
        };
        let Lookup { fingerprint, table } = tables
            .fingerprint(*addr, &members, size)
            .map_err(maglev_err)?;
        let same_table = old.is_some_and(|v| v.table_size == size && v.fingerprint == fingerprint);
        let table_offset = match old {
            Some(v) if same_table => v.table_offset,
            _ if size == 0 => 0,
            _ => {
                let regions = regions.get_or_insert_with(|| {
                    Regions::new(current.maglev_capacity, current.services.values())
                });
                let offset = regions
                    .allocate(size)
                    .ok_or_else(|| PlanError::MaglevFull {
                        service: svc.name.clone(),
                        addr: *addr,
                        size,
                        capacity: current.maglev_capacity,
                        free: regions.free(),
                    })?;
                // Remembered, but not in the maps (e.g. they were replaced): build it again.
                let entries = match table {
                    Some(t) => t,
                    None => maglev::build_table(&members, size).map_err(maglev_err)?,
                };
                table_ops.push(MapOp::WriteTable { offset, entries });
                offset
            }
        };
        let value = ServiceValue {
            id,
            table_offset,
            table_size: size,
            forwarding: svc.forwarding as u8,
            flags: if svc.flow_tracking {
                SERVICE_F_FLOW_TRACKING
            } else {
                0
            } | if svc.source_ranges.is_some() {
                SERVICE_F_SOURCE_RANGES
            } else {
                0
            } | if svc.affinity_timeout_s.is_some() {
                SERVICE_F_AFFINITY
            } else {
                0
            },
            _pad: [0; 2],
            fingerprint,
            affinity_timeout_s: svc.affinity_timeout_s.unwrap_or(0),
            _pad2: [0; 4],
        };
        indexed.push((lb_common::hash::service_slot(&key), key, value));
        if old != Some(&value) {
            service_ops.push(MapOp::SetService {
                key,
                value,
                fresh,
                name: svc.name.clone(),
            });
        }
    }
    tables.finish();

    for (key, value) in &vips {
        if current.vips.get(key) != Some(value) {
            out.ops.push(MapOp::SetVip {
                key: *key,
                value: *value,
            });
        }
    }
    out.ops.extend(backend_ops);
    for (prefix_len, range) in ranges.difference(&current.source_ranges) {
        out.ops.push(MapOp::AddSourceRange {
            prefix_len: *prefix_len,
            range: *range,
        });
    }
    out.ops.extend(table_ops);
    out.ops.extend(service_ops);
    index_ops(&mut indexed, current, &mut out.ops);
    if kept_services < current.services.len() {
        for key in current.services.keys() {
            let wanted = service_addr(key)
                .is_some_and(|a| service_key(&a) == *key && desired.services.contains_key(&a));
            if !wanted {
                out.ops.push(MapOp::DeleteService { key: *key });
            }
        }
    }
    out.ops
        .extend(existing.unused().map(|id| MapOp::ClearBackend { id }));
    for (prefix_len, range) in current.source_ranges.difference(&ranges) {
        out.ops.push(MapOp::RemoveSourceRange {
            prefix_len: *prefix_len,
            range: *range,
        });
    }
    for key in current.vips.keys() {
        if !vips.contains_key(key) {
            out.ops.push(MapOp::DeleteVip { key: *key });
        }
    }
    for key in current.dnat.keys() {
        if !dnat.contains_key(key) {
            out.ops.push(MapOp::DeleteDnat { key: *key });
        }
    }
    for (list, want, have) in decap_lists {
        for (prefix_len, addr) in have.difference(want) {
            out.ops.push(MapOp::RemoveDecap {
                list,
                prefix_len: *prefix_len,
                addr: *addr,
            });
        }
    }
    Ok(out)
}

/// The writes that make the service index (`LB_SVC_SLOTS`, `LB_SVC_RECORDS`) describe the
/// desired services `indexed` (slot, key, value): records first, then slots. Runs after the
/// `LB_SERVICES` writes (a shared slot sends packets there) and before its deletions.
///
/// A service alone in its slot is found through its record. A record the data plane may be
/// reading is never rewritten: a changed service gets its other bank, then the slot
/// switches to it.
fn index_ops(
    indexed: &mut [(u32, ServiceKey, ServiceValue)],
    current: &MapSnapshot,
    ops: &mut Vec<MapOp>,
) {
    indexed.sort_unstable_by_key(|(slot, key, _)| (*slot, *key));
    let mut slot_ops = Vec::new();
    for group in indexed.chunk_by(|a, b| a.0 == b.0) {
        let slot = group[0].0;
        let now = current
            .service_slots
            .get(&slot)
            .copied()
            .unwrap_or(SLOT_EMPTY);
        let &[(_, key, value)] = group else {
            if now != SLOT_SHARED {
                slot_ops.push(MapOp::SetServiceSlot {
                    slot,
                    value: SLOT_SHARED,
                });
            }
            continue;
        };
        let record = ServiceRecord {
            key,
            _pad: [0; 4],
            value,
        };
        // The record the slot points at now, if it is one of this service's two.
        let pointed = (now != SLOT_EMPTY && now != SLOT_SHARED)
            .then(|| now - 1)
            .filter(|index| index / 2 == value.id);
        if pointed.is_some_and(|index| current.service_records.get(&index) == Some(&record)) {
            continue;
        }
        let bank = pointed.map_or(0, |index| (index & 1) ^ 1);
        let index = lb_common::record_index(value.id, bank);
        ops.push(MapOp::SetServiceRecord { index, record });
        slot_ops.push(MapOp::SetServiceSlot {
            slot,
            value: lb_common::slot_value(index),
        });
    }
    for slot in current.service_slots.keys() {
        // `indexed` is sorted by slot.
        if indexed.binary_search_by_key(slot, |(s, _, _)| *s).is_err() {
            slot_ops.push(MapOp::SetServiceSlot {
                slot: *slot,
                value: SLOT_EMPTY,
            });
        }
    }
    ops.extend(slot_ops);
}

/// `LB_DNAT` entries of the desired local endpoints (only those of the service's family):
/// one per endpoint and service port, and for the endpoints of a service that takes its
/// VIP's fragments one more, `DNAT_FRAGMENTS`, which lets their fragments through.
pub fn dnat_entries(desired: &DesiredState) -> BTreeMap<DnatKey, DnatValue> {
    let mut out = BTreeMap::new();
    for (ep, &target) in &desired.local_endpoints {
        let (vip_be, family) = ip_bytes(ep.service.vip);
        let (backend_be, backend_family) = ip_bytes(ep.backend);
        if family != backend_family {
            continue;
        }
        let key = |port: u16| DnatKey {
            vip_be,
            backend_be,
            port_be: port.to_be(),
            proto: ep.service.protocol.number(),
            family,
        };
        let value = DnatValue {
            target_port_be: target.to_be(),
            _pad: [0; 2],
        };
        out.insert(key(ep.service.port), value);
        if desired
            .services
            .get(&ep.service)
            .is_some_and(|svc| svc.fragments)
        {
            out.insert(key(lb_common::DNAT_FRAGMENTS), value);
        }
    }
    out
}

/// What the maps hold after `ops` (the Maglev region itself is not modelled). Used by tests
/// and by the agent to keep its view current without reading the maps back.
pub fn apply_to_snapshot(snapshot: &mut MapSnapshot, ops: &[MapOp]) {
    for op in ops {
        match op {
            MapOp::SetConfig(c) => {
                snapshot.config = Some(*c);
                if c.flow_secret != [0; 4] {
                    snapshot.flow_secret = c.flow_secret;
                }
            }
            MapOp::SetVip { key, value } => {
                snapshot.vips.insert(*key, *value);
            }
            MapOp::DeleteVip { key } => {
                snapshot.vips.remove(key);
            }
            MapOp::AddSourceRange { prefix_len, range } => {
                snapshot.source_ranges.insert((*prefix_len, *range));
            }
            MapOp::RemoveSourceRange { prefix_len, range } => {
                snapshot.source_ranges.remove(&(*prefix_len, *range));
            }
            MapOp::SetBackend { id, value, .. } => {
                snapshot.backends.insert(*id, *value);
            }
            MapOp::WriteTable { .. } => {}
            MapOp::SetService { key, value, .. } => {
                snapshot.services.insert(*key, *value);
            }
            MapOp::DeleteService { key } => {
                snapshot.services.remove(key);
            }
            MapOp::ClearBackend { id } => {
                snapshot.backends.remove(id);
            }
            MapOp::SetDnat { key, value } => {
                snapshot.dnat.insert(*key, *value);
            }
            MapOp::DeleteDnat { key } => {
                snapshot.dnat.remove(key);
            }
            MapOp::SetServiceRecord { index, record } => {
                snapshot.service_records.insert(*index, *record);
            }
            MapOp::AddDecap {
                list,
                prefix_len,
                addr,
            } => {
                snapshot_decap(snapshot, *list).insert((*prefix_len, *addr));
            }
            MapOp::RemoveDecap {
                list,
                prefix_len,
                addr,
            } => {
                snapshot_decap(snapshot, *list).remove(&(*prefix_len, *addr));
            }
            MapOp::SetServiceSlot { slot, value } => {
                // The record the slot pointed at is unreachable from now on.
                let old = if *value == SLOT_EMPTY {
                    snapshot.service_slots.remove(slot)
                } else {
                    snapshot.service_slots.insert(*slot, *value)
                };
                if let Some(old) = old.filter(|o| *o != SLOT_SHARED && o != value) {
                    snapshot.service_records.remove(&(old - 1));
                }
            }
        }
    }
}

fn snapshot_decap(snapshot: &mut MapSnapshot, list: DecapList) -> &mut DecapEntries {
    match list {
        DecapList::Sources => &mut snapshot.decap_sources,
        DecapList::Destinations => &mut snapshot.decap_destinations,
    }
}

/// The forwarding mode of a service value, for display.
pub fn forwarding_name(v: &ServiceValue) -> &'static str {
    Forwarding::from_u8(v.forwarding).map_or("unknown", Forwarding::name)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::state::{BackendSpec, ServiceSpec};

    /// A data plane for plans made without one.
    pub(super) const TEST_LOADED: Loaded = Loaded {
        hz: 250,
        flow_buckets4: 1,
        flow_buckets6: 1,
    };

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(198, 18, 0, last))
    }

    fn svc_addr(port: u16) -> ServiceAddr {
        ServiceAddr {
            vip: ip(100),
            port,
            protocol: Protocol::Udp,
        }
    }

    fn service(name: &str, backends: &[(u8, u32)]) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            forwarding: Forwarding::Ipip,
            table_size: None,
            flow_tracking: false,
            source_ranges: None,
            fragments: false,
            affinity_timeout_s: None,
            backends: backends
                .iter()
                .map(|&(last, weight)| (ip(last), BackendSpec { weight, mac: None }))
                .collect(),
        }
    }

    fn node() -> NodeConfig {
        node_config(
            &DesiredState::default(),
            [2, 0, 0, 0, 0, 2],
            Some(std::net::Ipv4Addr::new(198, 18, 0, 2)),
            None,
            TEST_LOADED,
        )
    }

    fn macs() -> BTreeMap<IpAddr, [u8; 6]> {
        (1..=50).map(|i| (ip(i), [2, 0, 0, 0, 0, i])).collect()
    }

    fn empty(capacity: u32) -> MapSnapshot {
        MapSnapshot {
            maglev_capacity: capacity,
            ..Default::default()
        }
    }

    /// Apply a plan and check that planning again yields nothing.
    fn converge(desired: &DesiredState, snap: &mut MapSnapshot) -> Plan {
        let p = plan(desired, node(), &macs(), snap).unwrap();
        apply_to_snapshot(snap, &p.ops);
        let again = plan(desired, node(), &macs(), snap).unwrap();
        assert!(
            again.ops.is_empty(),
            "second plan not empty: {:?}",
            again.ops
        );
        p
    }

    #[test]
    fn first_sync_writes_everything_in_order() {
        let mut desired = DesiredState::default();
        desired
            .services
            .insert(svc_addr(53), service("dns", &[(11, 1), (12, 1)]));
        let mut snap = empty(10_000);
        let p = converge(&desired, &mut snap);
        let kinds: Vec<&str> = p
            .ops
            .iter()
            .map(|op| match op {
                MapOp::SetConfig(_) => "config",
                MapOp::SetVip { .. } => "vip",
                MapOp::DeleteVip { .. } => "delete vip",
                MapOp::AddSourceRange { .. } => "add range",
                MapOp::RemoveSourceRange { .. } => "remove range",
                MapOp::SetBackend { .. } => "backend",
                MapOp::WriteTable { .. } => "table",
                MapOp::SetService { .. } => "service",
                MapOp::DeleteService { .. } => "delete",
                MapOp::ClearBackend { .. } => "clear",
                MapOp::SetDnat { .. } => "dnat",
                MapOp::DeleteDnat { .. } => "delete dnat",
                MapOp::SetServiceRecord { .. } => "record",
                MapOp::SetServiceSlot { .. } => "slot",
                MapOp::AddDecap { .. } => "add decap",
                MapOp::RemoveDecap { .. } => "remove decap",
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "config", "vip", "backend", "backend", "table", "service", "record", "slot"
            ]
        );
        let MapOp::WriteTable { offset, entries } = &p.ops[4] else {
            unreachable!()
        };
        assert_eq!((*offset, entries.len()), (0, 1031)); // the smallest table size
        assert!(entries.iter().all(|e| *e == 0 || *e == 1));
    }

    #[test]
    fn unchanged_state_writes_nothing_and_restart_adopts_maps() {
        let mut desired = DesiredState::default();
        desired
            .services
            .insert(svc_addr(53), service("dns", &[(11, 1), (12, 2)]));
        desired
            .services
            .insert(svc_addr(54), service("other", &[(12, 1), (13, 1)]));
        let mut snap = empty(10_000);
        converge(&desired, &mut snap);
        // A restarted agent sees the same snapshot: it must write nothing.
        let p = plan(&desired, node(), &macs(), &snap.clone()).unwrap();
        assert!(p.ops.is_empty());
    }

    #[test]
    fn removing_a_backend_replaces_only_that_table_in_a_new_region() {
        let mut desired = DesiredState::default();
        desired
            .services
            .insert(svc_addr(53), service("dns", &[(11, 1), (12, 1), (13, 1)]));
        desired
            .services
            .insert(svc_addr(54), service("other", &[(11, 1)]));
        let mut snap = empty(10_000);
        converge(&desired, &mut snap);
        let before = snap.clone();
        desired
            .services
            .insert(svc_addr(53), service("dns", &[(11, 1), (12, 1)]));
        let p = converge(&desired, &mut snap);
        let dns = service_key(&svc_addr(53));
        // New table, then the switch, then backend 13 cleared.
        assert!(matches!(p.ops[0], MapOp::WriteTable { .. }));
        let MapOp::SetService {
            key, value, fresh, ..
        } = &p.ops[1]
        else {
            panic!("{:?}", p.ops)
        };
        assert_eq!((*key, *fresh), (dns, false));
        let old = before.services[&dns];
        assert_eq!(value.id, old.id);
        // The new region does not overlap the old one (readers may still use it).
        let (a, b) = (old.table_offset, value.table_offset);
        assert!(b >= a + old.table_size || b + value.table_size <= a);
        // The index: the service's other record, then its slot.
        assert!(matches!(p.ops[2], MapOp::SetServiceRecord { .. }));
        assert!(matches!(p.ops[3], MapOp::SetServiceSlot { .. }));
        assert!(matches!(p.ops[4], MapOp::ClearBackend { .. }));
        assert_eq!(p.ops.len(), 5);
        // The other service is untouched.
        assert_eq!(
            snap.services[&service_key(&svc_addr(54))],
            before.services[&service_key(&svc_addr(54))]
        );
    }

    #[test]
    fn freed_regions_are_reused_and_capacity_is_enforced() {
        let mut desired = DesiredState::default();
        desired
            .services
            .insert(svc_addr(53), service("dns", &[(11, 1)])); // 1031 slots
        let mut snap = empty(2_300);
        converge(&desired, &mut snap);
        // Changing the table needs a second region while the first is live: 2062 <= 2300.
        desired
            .services
            .insert(svc_addr(53), service("dns", &[(12, 1)]));
        converge(&desired, &mut snap);
        // ...and again: the first region is free again, so it still fits.
        desired
            .services
            .insert(svc_addr(53), service("dns", &[(13, 1)]));
        converge(&desired, &mut snap);
        // Two services of 1031 + a replacement of 1031 > 2300.
        desired
            .services
            .insert(svc_addr(54), service("b", &[(14, 1)]));
        converge(&desired, &mut snap);
        desired
            .services
            .insert(svc_addr(54), service("b", &[(15, 1)]));
        let err = plan(&desired, node(), &macs(), &snap).unwrap_err();
        assert!(
            matches!(
                err,
                PlanError::MaglevFull {
                    size: 1031,
                    capacity: 2_300,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn deleted_service_and_unused_backends_go_last() {
        let mut desired = DesiredState::default();
        desired
            .services
            .insert(svc_addr(53), service("dns", &[(11, 1)]));
        desired
            .services
            .insert(svc_addr(54), service("gone", &[(20, 1)]));
        let mut snap = empty(10_000);
        converge(&desired, &mut snap);
        desired.services.remove(&svc_addr(54));
        let p = converge(&desired, &mut snap);
        assert_eq!(p.ops.len(), 3, "{:?}", p.ops);
        assert!(matches!(
            p.ops[0],
            MapOp::SetServiceSlot {
                value: SLOT_EMPTY,
                ..
            }
        ));
        assert!(matches!(p.ops[1], MapOp::DeleteService { .. }));
        assert!(matches!(p.ops[2], MapOp::ClearBackend { .. }));
    }

    /// The backend entries a plan writes, by address.
    fn backends_by_addr(ops: &[MapOp]) -> BTreeMap<u8, (u32, BackendValue)> {
        ops.iter()
            .filter_map(|op| match op {
                MapOp::SetBackend { id, value, .. } => Some((value.addr_be[3], (*id, *value))),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn unresolved_backends_are_in_the_table_flagged_and_reported() {
        let mut desired = DesiredState::default();
        desired
            .services
            .insert(svc_addr(53), service("dns", &[(11, 1), (200, 1)]));
        let mut snap = empty(10_000);
        let p = plan(&desired, node(), &macs(), &snap).unwrap();
        assert_eq!(p.unresolved, vec![(svc_addr(53), ip(200))]);
        let backends = backends_by_addr(&p.ops);
        assert_eq!(backends.len(), 2);
        let (id200, b200) = backends[&200];
        assert_eq!(
            (b200.flags, b200.mac),
            (BACKEND_F_VALID | BACKEND_F_NO_NEIGH, [0; 6])
        );
        assert_eq!(backends[&11].1.flags, BACKEND_F_VALID);
        let table = p
            .ops
            .iter()
            .find_map(|op| match op {
                MapOp::WriteTable { entries, .. } => Some(entries.clone()),
                _ => None,
            })
            .expect("a table");
        assert!(table.contains(&id200), "the unresolved backend has slots");
        apply_to_snapshot(&mut snap, &p.ops);

        // Its MAC resolves: one backend write, the same entry, the table and service kept.
        let mut resolved = macs();
        resolved.insert(ip(200), [2, 0, 0, 0, 0, 200]);
        let p = plan(&desired, node(), &resolved, &snap).unwrap();
        assert!(p.unresolved.is_empty());
        let want = BackendValue {
            mac: [2, 0, 0, 0, 0, 200],
            flags: BACKEND_F_VALID,
            ..b200
        };
        assert_eq!(
            p.ops,
            [MapOp::SetBackend {
                id: id200,
                value: want,
                fresh: false,
            }]
        );
        apply_to_snapshot(&mut snap, &p.ops);
        assert!(
            plan(&desired, node(), &resolved, &snap)
                .unwrap()
                .ops
                .is_empty()
        );

        // A service whose only backend is unresolved still gets its table (the data plane
        // drops its packets as `DropNoNeighbor`, not `DropNoBackend`).
        let mut desired = DesiredState::default();
        desired
            .services
            .insert(svc_addr(53), service("dns", &[(200, 1)]));
        let p = plan(&desired, node(), &macs(), &empty(10_000)).unwrap();
        let svc = p.ops.iter().find_map(|op| match op {
            MapOp::SetService { value, .. } => Some(*value),
            _ => None,
        });
        assert_eq!(svc.map(|v| v.table_size), Some(1031));
    }

    #[test]
    fn a_next_hop_goes_pending_failed_asked_again_and_back_with_one_write_per_change() {
        let mut desired = DesiredState::default();
        desired
            .services
            .insert(svc_addr(53), service("dns", &[(11, 1), (200, 1)]));
        let mut snap = empty(10_000);
        let mut cache = TableCache::default();
        let mac200 = [2, 0, 0, 0, 0, 200];
        let resolved = {
            let mut m = macs();
            m.insert(ip(200), mac200);
            m
        };
        let none = BTreeSet::new();
        let failed = BTreeSet::from([ip(200)]);
        // (step, MACs known, next hops failed, backend 200's flags and MAC after it, whether
        // the step writes it)
        type Step<'a> = (
            &'a str,
            &'a BTreeMap<IpAddr, [u8; 6]>,
            &'a BTreeSet<IpAddr>,
            u8,
            [u8; 6],
            bool,
        );
        let unknown = macs();
        let steps: [Step<'_>; 7] = [
            (
                "new, not resolved yet",
                &unknown,
                &none,
                BACKEND_F_NO_NEIGH,
                [0; 6],
                true,
            ),
            ("resolved", &resolved, &none, 0, mac200, true),
            (
                "the kernel asks again (STALE, entry gone)",
                &unknown,
                &none,
                0,
                mac200,
                false,
            ),
            (
                "the next hop failed",
                &unknown,
                &failed,
                BACKEND_F_UNREACHABLE,
                [0; 6],
                true,
            ),
            (
                "asked again after failing",
                &unknown,
                &none,
                BACKEND_F_UNREACHABLE,
                [0; 6],
                false,
            ),
            (
                "failed again",
                &unknown,
                &failed,
                BACKEND_F_UNREACHABLE,
                [0; 6],
                false,
            ),
            ("back", &resolved, &none, 0, mac200, true),
        ];
        let mut id = None;
        for (i, (step, macs, failed, flags, mac, writes)) in steps.into_iter().enumerate() {
            let hops = NextHops { macs, failed };
            let p = plan_with_hops(&desired, node(), hops, &snap, &mut cache).unwrap();
            let written = backends_by_addr(&p.ops);
            // After the first plan (which writes everything), only backend 200's entry.
            if i > 0 {
                assert_eq!(p.ops.len(), usize::from(writes), "{step}: {:?}", p.ops);
            }
            apply_to_snapshot(&mut snap, &p.ops);
            let (got_id, got) = snap
                .backends
                .iter()
                .find(|(_, b)| b.addr_be[3] == 200)
                .map(|(i, b)| (*i, *b))
                .unwrap();
            if writes {
                assert_eq!(written[&200].0, got_id, "{step}");
            }
            assert_eq!(*id.get_or_insert(got_id), got_id, "{step}: the same entry");
            assert_eq!(
                (got.flags, got.mac),
                (BACKEND_F_VALID | flags, mac),
                "{step}"
            );
            assert_eq!(
                p.unresolved.len(),
                usize::from(flags == BACKEND_F_NO_NEIGH),
                "{step}"
            );
            assert_eq!(
                p.unreachable,
                if flags == BACKEND_F_UNREACHABLE {
                    vec![(svc_addr(53), ip(200))]
                } else {
                    vec![]
                },
                "{step}"
            );
        }
    }

    #[test]
    fn tables_are_the_same_whether_or_not_macs_are_resolved() {
        let mut desired = DesiredState::default();
        desired.services.insert(
            svc_addr(53),
            service("dns", &[(11, 1), (12, 2), (13, 1), (14, 1)]),
        );
        desired
            .services
            .insert(svc_addr(54), service("only", &[(15, 1)]));
        // Each slot as the backend address it sends to, and the service entries.
        let outcome = |macs: &BTreeMap<IpAddr, [u8; 6]>| {
            let p = plan(&desired, node(), macs, &empty(10_000)).unwrap();
            let addr_of: BTreeMap<u32, u8> = backends_by_addr(&p.ops)
                .into_iter()
                .map(|(addr, (id, _))| (id, addr))
                .collect();
            let tables: Vec<Vec<u8>> = p
                .ops
                .iter()
                .filter_map(|op| match op {
                    MapOp::WriteTable { entries, .. } => {
                        Some(entries.iter().map(|id| addr_of[id]).collect())
                    }
                    _ => None,
                })
                .collect();
            let services: Vec<ServiceValue> = p
                .ops
                .iter()
                .filter_map(|op| match op {
                    MapOp::SetService { value, .. } => Some(*value),
                    _ => None,
                })
                .collect();
            (tables, services, p.unresolved.len())
        };
        let all = macs();
        let (tables, services, unresolved) = outcome(&all);
        assert_eq!((tables.len(), services.len(), unresolved), (2, 2, 0));
        for missing in [vec![12], vec![11, 13], vec![11, 12, 13, 14, 15]] {
            let mut some = all.clone();
            for last in &missing {
                some.remove(&ip(*last));
            }
            let (t, s, u) = outcome(&some);
            assert_eq!(u, missing.len());
            assert_eq!(t, tables, "tables differ without MACs of {missing:?}");
            assert_eq!(s, services, "services differ without MACs of {missing:?}");
        }
    }

    #[test]
    fn ids_are_reused_lowest_first_and_stable() {
        let mut desired = DesiredState::default();
        desired
            .services
            .insert(svc_addr(1), service("a", &[(11, 1)]));
        desired
            .services
            .insert(svc_addr(2), service("b", &[(12, 1)]));
        desired
            .services
            .insert(svc_addr(3), service("c", &[(13, 1)]));
        let mut snap = empty(10_000);
        converge(&desired, &mut snap);
        let id_of = |snap: &MapSnapshot, port| snap.services[&service_key(&svc_addr(port))].id;
        assert_eq!(
            [id_of(&snap, 1), id_of(&snap, 2), id_of(&snap, 3)],
            [0, 1, 2]
        );
        desired.services.remove(&svc_addr(2));
        converge(&desired, &mut snap);
        desired
            .services
            .insert(svc_addr(4), service("d", &[(14, 1)]));
        let p = converge(&desired, &mut snap);
        assert_eq!(
            [id_of(&snap, 1), id_of(&snap, 3), id_of(&snap, 4)],
            [0, 2, 1]
        );
        assert!(
            p.ops
                .iter()
                .any(|op| matches!(op, MapOp::SetService { fresh: true, .. }))
        );
    }

    #[test]
    fn a_shared_address_has_one_entry_per_service() {
        let mut desired = DesiredState::default();
        desired
            .services
            .insert(svc_addr(53), service("a", &[(11, 1), (12, 1)]));
        let mut b = service("b", &[(11, 1)]);
        b.flow_tracking = true;
        desired.services.insert(svc_addr(54), b);
        let mut snap = empty(10_000);
        converge(&desired, &mut snap);
        let entries_for = |snap: &MapSnapshot, last: u8| {
            snap.backends
                .values()
                .filter(|v| v.addr_be[3] == last)
                .map(|v| v.service_id)
                .collect::<Vec<_>>()
        };
        let (a_id, b_id) = (
            snap.services[&service_key(&svc_addr(53))].id,
            snap.services[&service_key(&svc_addr(54))].id,
        );
        assert_eq!(entries_for(&snap, 11), vec![a_id, b_id]);
        assert_eq!(
            snap.services[&service_key(&svc_addr(54))].flags,
            SERVICE_F_FLOW_TRACKING
        );
        assert_eq!(snap.services[&service_key(&svc_addr(53))].flags, 0);
        // Dropping .11 from service a clears a's entry only; b's flows to .11 are untouched.
        desired
            .services
            .insert(svc_addr(53), service("a", &[(12, 1)]));
        let p = converge(&desired, &mut snap);
        assert_eq!(entries_for(&snap, 11), vec![b_id]);
        assert_eq!(
            p.ops
                .iter()
                .filter(|op| matches!(op, MapOp::ClearBackend { .. }))
                .count(),
            1
        );
    }

    #[test]
    fn key_round_trip() {
        let a = svc_addr(53);
        let k = service_key(&a);
        assert_eq!(k.addr_be[..4], [198, 18, 0, 100]);
        assert_eq!(k.port_be, 53u16.to_be());
        assert_eq!(service_addr(&k), Some(a));
    }

    #[test]
    fn local_endpoints_are_translated_here_and_need_no_next_hop() {
        let mut desired = DesiredState::default();
        desired
            .services
            .insert(svc_addr(53), service("dns", &[(11, 1), (77, 1)]));
        // 77 is a pod on this node (and has no MAC in `macs()`).
        desired.local_endpoints.insert(
            LocalEndpoint {
                service: svc_addr(53),
                backend: ip(77),
            },
            5353,
        );
        let mut snap = empty(10_000);
        let p = converge(&desired, &mut snap);
        assert!(p.unresolved.is_empty(), "{:?}", p.unresolved);
        let local: Vec<&BackendValue> = snap
            .backends
            .values()
            .filter(|b| b.flags & BACKEND_F_LOCAL != 0)
            .collect();
        assert_eq!(local.len(), 1);
        assert_eq!(local[0].addr_be[..4], [198, 18, 0, 77]);
        assert_eq!(
            local[0].mac,
            node().mac,
            "frames to a local pod stay on the node"
        );
        let (key, value) = snap.dnat.iter().next().expect("a DNAT entry");
        assert_eq!(
            (
                key.vip_be[..4].to_vec(),
                key.backend_be[..4].to_vec(),
                u16::from_be(key.port_be),
                key.proto
            ),
            (
                vec![198, 18, 0, 100],
                vec![198, 18, 0, 77],
                53,
                lb_common::PROTO_UDP
            )
        );
        assert_eq!(u16::from_be(value.target_port_be), 5353);

        // The pod moves away (and its address has no next hop here): its translation goes,
        // after its entry stopped being local.
        desired.local_endpoints.clear();
        let p = plan(&desired, node(), &macs(), &snap).unwrap();
        assert!(
            matches!(p.ops.last(), Some(MapOp::DeleteDnat { .. })),
            "{:?}",
            p.ops
        );
        assert_eq!(p.unresolved, vec![(svc_addr(53), ip(77))]);
    }

    #[test]
    fn session_affinity_sets_flag_and_timeout() {
        let mut desired = DesiredState::default();
        let mut svc = service("dns", &[(11, 1)]);
        svc.affinity_timeout_s = Some(600);
        desired.services.insert(svc_addr(53), svc);
        let mut snap = empty(10_000);
        converge(&desired, &mut snap);
        let v = snap.services.values().next().unwrap();
        assert_ne!(v.flags & SERVICE_F_AFFINITY, 0);
        assert_eq!(v.affinity_timeout_s, 600);
    }

    fn position(ops: &[MapOp], f: impl Fn(&MapOp) -> bool) -> usize {
        ops.iter().position(f).unwrap_or_else(|| panic!("{ops:?}"))
    }

    /// The record the index gives for a key, as the data plane would find it.
    fn indexed(snap: &MapSnapshot, key: &ServiceKey) -> Option<ServiceValue> {
        match *snap
            .service_slots
            .get(&lb_common::hash::service_slot(key))?
        {
            SLOT_SHARED => snap.services.get(key).copied(),
            v => snap
                .service_records
                .get(&(v - 1))
                .filter(|r| r.key == *key)
                .map(|r| r.value),
        }
    }

    #[test]
    fn index_records_are_written_before_their_slot_and_banks_alternate() {
        let mut desired = DesiredState::default();
        desired
            .services
            .insert(svc_addr(53), service("dns", &[(11, 1)]));
        let mut snap = empty(10_000);
        let p = converge(&desired, &mut snap);
        let record = position(&p.ops, |o| matches!(o, MapOp::SetServiceRecord { .. }));
        let slot = position(&p.ops, |o| matches!(o, MapOp::SetServiceSlot { .. }));
        let service = position(&p.ops, |o| matches!(o, MapOp::SetService { .. }));
        assert!(service < record && record < slot, "{:?}", p.ops);
        let key = service_key(&svc_addr(53));
        let id = snap.services[&key].id;
        let slot_of = lb_common::hash::service_slot(&key);
        assert_eq!(
            snap.service_slots[&slot_of],
            lb_common::slot_value(lb_common::record_index(id, 0))
        );
        assert_eq!(indexed(&snap, &key), Some(snap.services[&key]));

        // Each change goes to the bank the data plane is not reading.
        for (round, bank) in [(12u8, 1u32), (13, 0), (14, 1)] {
            desired
                .services
                .get_mut(&svc_addr(53))
                .unwrap()
                .backends
                .insert(
                    ip(round),
                    BackendSpec {
                        weight: 1,
                        mac: None,
                    },
                );
            let p = converge(&desired, &mut snap);
            let written: Vec<u32> = p
                .ops
                .iter()
                .filter_map(|o| match o {
                    MapOp::SetServiceRecord { index, .. } => Some(*index),
                    _ => None,
                })
                .collect();
            assert_eq!(written, [lb_common::record_index(id, bank)]);
            assert_eq!(indexed(&snap, &key), Some(snap.services[&key]));
        }

        // Removed: the slot is emptied before the entry goes.
        desired.services.clear();
        let p = converge(&desired, &mut snap);
        let slot = position(&p.ops, |o| {
            matches!(
                o,
                MapOp::SetServiceSlot {
                    value: SLOT_EMPTY,
                    ..
                }
            )
        });
        let delete = position(&p.ops, |o| matches!(o, MapOp::DeleteService { .. }));
        assert!(slot < delete, "{:?}", p.ops);
        assert!(snap.service_slots.is_empty());
    }

    #[test]
    fn services_sharing_a_slot_are_found_in_the_hash_map() {
        // Two ports of one VIP whose keys hash to the same slot.
        let slot_of = |port: u16| lb_common::hash::service_slot(&service_key(&svc_addr(port)));
        let mut seen = BTreeMap::new();
        let (a, b) = (1..u16::MAX)
            .find_map(|port| seen.insert(slot_of(port), port).map(|other| (other, port)))
            .unwrap();
        let mut desired = DesiredState::default();
        desired
            .services
            .insert(svc_addr(a), service("a", &[(11, 1)]));
        let mut snap = empty(10_000);
        converge(&desired, &mut snap);
        desired
            .services
            .insert(svc_addr(b), service("b", &[(12, 1)]));
        let p = converge(&desired, &mut snap);
        // The newcomer's entry exists before the slot says "shared".
        let entry = position(&p.ops, |o| matches!(o, MapOp::SetService { .. }));
        let shared = position(&p.ops, |o| {
            matches!(
                o,
                MapOp::SetServiceSlot {
                    value: SLOT_SHARED,
                    ..
                }
            )
        });
        assert!(entry < shared, "{:?}", p.ops);
        for port in [a, b] {
            let key = service_key(&svc_addr(port));
            assert_eq!(
                indexed(&snap, &key),
                Some(snap.services[&key]),
                "port {port}"
            );
        }

        // One left: back to its own record.
        desired.services.remove(&svc_addr(a));
        converge(&desired, &mut snap);
        let key = service_key(&svc_addr(b));
        assert_ne!(snap.service_slots[&slot_of(b)], SLOT_SHARED);
        assert_eq!(indexed(&snap, &key), Some(snap.services[&key]));
        assert_eq!(indexed(&snap, &service_key(&svc_addr(a))), None);
    }

    #[test]
    fn a_damaged_record_is_rewritten() {
        let mut desired = DesiredState::default();
        desired
            .services
            .insert(svc_addr(53), service("dns", &[(11, 1)]));
        let mut snap = empty(10_000);
        converge(&desired, &mut snap);
        // As after an upgrade that replaced LB_SVC_RECORDS but kept the slots.
        for r in snap.service_records.values_mut() {
            *r = ServiceRecord {
                key: ServiceKey::v4([0; 4], 0, 0),
                _pad: [0; 4],
                value: r.value,
            };
        }
        converge(&desired, &mut snap);
        let key = service_key(&svc_addr(53));
        assert_eq!(indexed(&snap, &key), Some(snap.services[&key]));
    }

    #[test]
    fn decap_allow_lists_follow_the_desired_state_and_go_last() {
        let host = |s: &str| decap_prefix(&s.parse::<IpAddr>().unwrap().into());
        let net = |s: &str| decap_prefix(&s.parse().unwrap());
        let mut desired = DesiredState::default();
        desired
            .services
            .insert(svc_addr(53), service("dns", &[(11, 1)]));
        desired.decap_sources = ["198.18.0.3/32", "198.18.4.0/24"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        desired.node_addresses = ["198.18.0.2", "198.18.0.9"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        // Off: nothing is allowed, whatever the lists say.
        let mut snap = empty(10_000);
        converge(&desired, &mut snap);
        assert!(snap.decap_sources.is_empty() && snap.decap_destinations.is_empty());

        // On: the configured senders and the node's own encapsulation source; the node's
        // addresses (the encapsulation source among them) and its local endpoint.
        desired.node.decap = true;
        desired.local_endpoints.insert(
            LocalEndpoint {
                service: svc_addr(53),
                backend: ip(11),
            },
            5353,
        );
        let p = converge(&desired, &mut snap);
        assert_eq!(
            snap.decap_sources,
            BTreeSet::from([host("198.18.0.2"), host("198.18.0.3"), net("198.18.4.0/24")])
        );
        assert_eq!(
            snap.decap_destinations,
            BTreeSet::from([host("198.18.0.2"), host("198.18.0.9"), host("198.18.0.11")])
        );
        // Added before the translations that need them.
        let first_dnat = p
            .ops
            .iter()
            .position(|o| matches!(o, MapOp::SetDnat { .. }));
        let last_add = p
            .ops
            .iter()
            .rposition(|o| matches!(o, MapOp::AddDecap { .. }));
        assert!(
            last_add.is_some() && first_dnat.is_some() && last_add < first_dnat,
            "{:?}",
            p.ops
        );

        // A sender leaves: removed, and only after everything else.
        desired
            .decap_sources
            .remove(&"198.18.0.3/32".parse().unwrap());
        desired.services.clear();
        desired.local_endpoints.clear();
        let p = converge(&desired, &mut snap);
        let removes: Vec<&MapOp> = p
            .ops
            .iter()
            .skip_while(|o| !matches!(o, MapOp::RemoveDecap { .. }))
            .collect();
        assert_eq!(removes.len(), 2, "{:?}", p.ops);
        assert!(
            removes
                .iter()
                .all(|o| matches!(o, MapOp::RemoveDecap { .. }))
        );
        assert!(!snap.decap_sources.contains(&host("198.18.0.3")));
        assert!(!snap.decap_destinations.contains(&host("198.18.0.11")));
    }
}
