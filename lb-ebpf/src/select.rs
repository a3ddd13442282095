//! VIP lookup, the flow table, and the Maglev decision.
//!
//! Order for a tracked service: a TCP SYN always takes a fresh Maglev decision (remembered
//! only in an entry its 5-tuple already has: new connections are remembered from their
//! second packet on, so SYN floods create no state); any other
//! packet follows its remembered flow if the entry is fresh and its backend still belongs to
//! the service; otherwise Maglev decides (so a node that never saw the SYN picks the same
//! backend as every other node) and the decision is remembered, unless the flood guard says
//! this CPU has created too many entries this second.
//!
//! Every backend stays in its table whatever the agent knows of its next hop, so the tables
//! are the same on every node. A backend whose next-hop MAC the agent is still resolving
//! (`BACKEND_F_NO_NEIGH`, a new one) gets nothing: a packet decided for it, by Maglev or by a
//! remembered flow or client, is dropped (`DropNoNeighbor`) and nothing new is remembered,
//! so the client's retransmission once the MAC is known takes the same decision and starts
//! the flow as usual. A backend whose next hop failed to resolve (`BACKEND_F_UNREACHABLE`:
//! its node is gone) is passed over: its slots send to the backend of the next slot that
//! can take the packet (`FallbackUnreachable`), and its remembered flows and clients are
//! decided afresh that way, while every other flow stays where it is.
//!
//! A service with session affinity places each client (source address) by Maglev on its
//! addresses alone and remembers the client's backend in `LB_AFFINITY` while the client keeps
//! sending within the timeout, so it keeps its backend when the backend set changes too.

use aya_ebpf::{btf_maps::lpm_trie::Key, helpers::bpf_jiffies64};
use lb_common::{
    AffinityKey, BACKEND_F_NO_NEIGH, BackendValue, FAMILY_V4, FlowEntry4, FlowEntry6, FlowState,
    FlowValue, NodeConfig, PROTO_TCP, Reason, SERVICE_F_AFFINITY, SERVICE_F_FLOW_TRACKING,
    SERVICE_F_SOURCE_RANGES, SLOT_EMPTY, SLOT_SHARED, ServiceKey, ServiceValue, SourceRange,
    VipKey, VipValue,
    flowtab::{self, WAYS},
    hash::{FALLBACK_SLOTS, fallback_slot, flow_hash_v4, flow_hash_v6_folded},
};

use crate::{
    Verdict,
    maps::{
        LB_AFFINITY, LB_BACKENDS, LB_FLOOD, LB_FLOWTAB4, LB_FLOWTAB6, LB_MAGLEV, LB_SERVICES,
        LB_SRC_RANGES, LB_SVC_RECORDS, LB_SVC_SLOTS, LB_VIPS,
    },
    parse::{AddrWords, Packet, addr_bytes},
    stats,
};

/// `BPF_ANY`.
const ANY: u64 = 0;

/// The outcome of backend selection.
pub struct Selected {
    pub backend_id: u32,
    /// Read in place, not copied: a copy would be no more consistent (it is not one atomic
    /// read either), and the entry's service id is checked before use.
    pub backend: &'static BackendValue,
    /// Decided by Maglev now (not taken from the flow table).
    pub new_flow: bool,
    /// The flow hash when the decision computed it or the flow entry held it, else 0 (GUE
    /// and IPv6 outer headers reuse it; a hash that happens to be 0 is just computed again).
    pub flow_hash: u32,
}

/// Is the packet's client allowed by the service's source ranges (if it has any)?
#[inline(always)]
fn source_allowed(pkt: &Packet, service: &ServiceValue) -> bool {
    if service.flags & SERVICE_F_SOURCE_RANGES == 0 {
        return true;
    }
    let key = Key::new(
        32 + 128,
        SourceRange {
            service_id_be: service.id.to_be_bytes(),
            addr_be: addr_bytes(pkt.src),
        },
    );
    LB_SRC_RANGES.get(&key).is_some()
}

/// The service a packet is addressed to; `Err(pass)` when it is not a VIP, `Err(drop)` when
/// its client is not allowed.
#[inline(always)]
pub fn service(pkt: &Packet) -> Result<&'static ServiceValue, Verdict> {
    let service = service_of(pkt)?;
    if !source_allowed(pkt, service) {
        return Err(Verdict::drop(Reason::DropSourceRange));
    }
    Ok(service)
}

/// Does `key` hold `addr` and `tail` (its last word: port, protocol, family)? Compared word
/// by word against values in registers: a struct comparison would become a byte-loop `memcmp`
/// call in BPF code, and a key built on the stack from narrow fields and read back as words
/// would stall on store forwarding.
#[inline(always)]
fn key_is(key: &ServiceKey, addr: AddrWords, tail: u32) -> bool {
    let k = (key as *const ServiceKey).cast::<u32>();
    // SAFETY: a key is 20 bytes, aligned to 4 (`ServiceKey` is `align(4)`).
    let w = |i: usize| unsafe { *k.add(i) };
    ((w(0) ^ addr[0]) | (w(1) ^ addr[1]) | (w(2) ^ addr[2]) | (w(3) ^ addr[3]) | (w(4) ^ tail)) == 0
}

/// The service of the packet's destination with `port_be`: the slot its hash picks in
/// `LB_SVC_SLOTS` says "none" (most packets that are not for a VIP stop here, before the key
/// is even built), or names the one record that may match, or sends the few keys that
/// share a slot to `LB_SERVICES`.
#[inline(always)]
fn find_service(pkt: &Packet, port_be: u16) -> Option<&'static ServiceValue> {
    let slot = lb_common::hash::service_slot_folded(pkt.dst_fold, port_be, pkt.proto, pkt.family);
    match *LB_SVC_SLOTS.get(slot)? {
        SLOT_EMPTY => None,
        SLOT_SHARED => {
            let key = ServiceKey {
                addr_be: addr_bytes(pkt.dst),
                port_be,
                proto: pkt.proto,
                family: pkt.family,
            };
            // SAFETY: read in place during this run; the agent replaces entries whole.
            unsafe { LB_SERVICES.get(&key) }
        }
        value => {
            // The agent writes a changed record into the service's other bank and then
            // points the slot at it, so the record read (in place) here is never being
            // rewritten.
            let record = LB_SVC_RECORDS.get(value.wrapping_sub(1))?;
            // ServiceKey's last word: port, protocol, family.
            let tail = port_be as u32 | ((pkt.proto as u32) << 16) | ((pkt.family as u32) << 24);
            key_is(&record.key, pkt.dst, tail).then_some(&record.value)
        }
    }
}

#[inline(always)]
fn service_of(pkt: &Packet) -> Result<&'static ServiceValue, Verdict> {
    let port_be = if pkt.fragment {
        fragment_port(pkt)?
    } else {
        pkt.dport_be()
    };
    find_service(pkt, port_be).ok_or(Verdict::pass(Reason::PassNotVip))
}

#[inline(always)]
fn backend_of(id: u32, service: &ServiceValue) -> Option<&'static BackendValue> {
    let b = LB_BACKENDS.get(id)?;
    (b.is_valid() && b.service_id == service.id).then_some(b)
}

/// A backend of `service` that is not unreachable: one a remembered flow or client may
/// keep.
#[inline(always)]
fn live_backend_of(id: u32, service: &ServiceValue) -> Option<&'static BackendValue> {
    backend_of(id, service).filter(|b| !b.is_unreachable())
}

/// `Err(drop)` for a backend whose next-hop MAC is not known yet: there is nowhere to send
/// its packets to.
#[inline(always)]
fn reachable(backend: &BackendValue) -> Result<(), Verdict> {
    if backend.flags & BACKEND_F_NO_NEIGH != 0 {
        return Err(Verdict::drop(Reason::DropNoNeighbor));
    }
    Ok(())
}

/// The backend id in the first of the [`FALLBACK_SLOTS`] slots after `slot` (relative to
/// the service's table, wrapping) whose backend can take a packet, or `u32::MAX`. Only
/// called when the backend of `slot` is unreachable; its own function, so the bounded loop
/// is verified once rather than at every caller.
#[inline(never)]
fn fallback(slot: u32, table_offset: u32, table_size: u32, service_id: u32) -> u32 {
    let mut attempt = 1;
    while attempt <= FALLBACK_SLOTS {
        let at = table_offset.wrapping_add(fallback_slot(slot, attempt, table_size));
        if let Some(&id) = LB_MAGLEV.get(at)
            && let Some(b) = LB_BACKENDS.get(id)
            && b.is_valid()
            && b.service_id == service_id
            && b.can_take()
        {
            return id;
        }
        attempt += 1;
    }
    u32::MAX
}

/// The settings of a VIP (any port), if `addr_be` is one.
#[inline(always)]
pub fn vip(addr: AddrWords, family: u8) -> Option<VipValue> {
    let key = VipKey::new(addr_bytes(addr), family);
    // SAFETY: the value is copied out at once.
    unsafe { LB_VIPS.get(&key) }.copied()
}

/// The port of the service that takes fragments to the packet's VIP: fragments to other
/// addresses pass, fragments to a VIP without such a service are dropped (counted).
#[inline(always)]
fn fragment_port(pkt: &Packet) -> Result<u16, Verdict> {
    let vip = vip(pkt.dst, pkt.family).ok_or(Verdict::pass(Reason::PassFragment))?;
    let port = if pkt.proto == PROTO_TCP {
        vip.frag_port_tcp_be
    } else {
        vip.frag_port_udp_be
    };
    if port == 0 {
        return Err(Verdict::drop(Reason::DropFragment));
    }
    Ok(port)
}

/// The flow hash of a packet (the same function the agent and `lb-agent trace` use).
#[inline(always)]
pub fn flow_hash(pkt: &Packet) -> u32 {
    hash_of(pkt, pkt.sport_be(), pkt.dport_be())
}

/// The hash of a packet's addresses and protocol with the given ports (zero for the client
/// hash of session affinity, as fragments have).
#[inline(always)]
fn hash_of(pkt: &Packet, sport: u16, dport: u16) -> u32 {
    if pkt.family == FAMILY_V4 {
        // An IPv4 address's fold is the address word itself.
        flow_hash_v4(pkt.src_fold, pkt.dst_fold, sport, dport, pkt.proto)
    } else {
        flow_hash_v6_folded(pkt.src_fold, pkt.dst_fold, sport, dport, pkt.proto)
    }
}

#[inline(always)]
fn maglev(
    hash: u32,
    service: &ServiceValue,
    bytes: u64,
) -> Result<(u32, &'static BackendValue), Verdict> {
    if service.table_size == 0 {
        return Err(Verdict::drop(Reason::DropNoBackend));
    }
    let slot = lb_common::hash::slot(hash, service.table_size);
    let mut id = *LB_MAGLEV
        .get(service.table_offset.wrapping_add(slot))
        .ok_or(Verdict::drop(Reason::DropNoBackend))?;
    let mut backend = backend_of(id, service).ok_or(Verdict::drop(Reason::DropNoBackend))?;
    if backend.is_unreachable() {
        id = fallback(slot, service.table_offset, service.table_size, service.id);
        backend = backend_of(id, service).ok_or(Verdict::drop(Reason::DropNoBackend))?;
        stats::count_reason(Reason::FallbackUnreachable, bytes);
    }
    // Before anything remembers the decision.
    reachable(backend)?;
    Ok((id, backend))
}

/// The flow table of one address family, whose keys are `N` words: buckets of `WAYS`
/// entries, each the key's words followed by a `FlowState` (`lb_common` asserts the
/// layout). The tracked path is generic over it, so each family's copy compares its own key
/// length in straight-line code.
trait FlowTable<const N: usize> {
    /// Bucket `i`.
    fn bucket(i: u32) -> Option<*mut u8>;
    /// How many buckets the table has.
    fn buckets(cfg: &NodeConfig) -> u32;
}

struct Flows4;
impl FlowTable<4> for Flows4 {
    #[inline(always)]
    fn bucket(i: u32) -> Option<*mut u8> {
        LB_FLOWTAB4.get_ptr_mut(i).map(|b| b.cast())
    }
    #[inline(always)]
    fn buckets(cfg: &NodeConfig) -> u32 {
        cfg.flow_buckets4
    }
}

struct Flows6;
impl FlowTable<10> for Flows6 {
    #[inline(always)]
    fn bucket(i: u32) -> Option<*mut u8> {
        LB_FLOWTAB6.get_ptr_mut(i).map(|b| b.cast())
    }
    #[inline(always)]
    fn buckets(cfg: &NodeConfig) -> u32 {
        cfg.flow_buckets6
    }
}

// The entries as `Place` reads them: the key's words, then the state.
const _: () = assert!(
    Place::<4>::ENTRY == size_of::<FlowEntry4>() && Place::<10>::ENTRY == size_of::<FlowEntry6>()
);

/// Where a flow is (or would be) remembered: its bucket and its key's tag.
struct Place<const N: usize> {
    bucket: *mut u8,
    tag: u32,
}

impl<const N: usize> Place<N> {
    const ENTRY: usize = 4 * N + size_of::<FlowState>();

    /// The place of the key whose `flowtab::key_hash` inputs are given, under the node's
    /// secret (in `cfg`, which the path reads anyway: no other map, no helper call).
    #[inline(always)]
    fn of<T: FlowTable<N>>(cfg: &NodeConfig, hash_in: [u32; 4]) -> Option<Self> {
        let h = flowtab::key_hash(
            &cfg.flow_secret,
            hash_in[0],
            hash_in[1],
            hash_in[2],
            hash_in[3],
        );
        let bucket = T::bucket(flowtab::bucket_index(h, T::buckets(cfg)))?;
        Some(Place {
            bucket,
            tag: flowtab::tag(h),
        })
    }

    #[inline(always)]
    fn key(&self, way: usize) -> *mut u32 {
        self.bucket.wrapping_add(way * Self::ENTRY).cast()
    }

    #[inline(always)]
    fn state(&self, way: usize) -> *mut FlowState {
        self.bucket.wrapping_add(way * Self::ENTRY + 4 * N).cast()
    }

    /// The entry of `key` and its backend id: the way whose key words and tag match. The
    /// backend id and the tag are one 8-byte load, so they belong to the same write.
    #[inline(always)]
    fn find(&self, key: &[u32; N]) -> Option<(*mut FlowState, u32)> {
        for way in 0..WAYS {
            let k = self.key(way);
            let mut diff = 0;
            for (i, w) in key.iter().enumerate() {
                // SAFETY: the bucket is a map value of WAYS entries of N words and a state.
                diff |= unsafe { *k.add(i) } ^ *w;
            }
            if diff == 0 {
                let state = self.state(way);
                // SAFETY: as above; the state is 8-aligned. Volatile: never split in two.
                let pair: [u32; 2] =
                    unsafe { core::mem::transmute(core::ptr::read_volatile(state.cast::<u64>())) };
                if pair[1] == self.tag {
                    return Some((state, pair[0]));
                }
            }
        }
        None
    }

    /// Point an entry of this place at `backend_id`, stamped `now`: the pair of backend and
    /// tag is written last, in one store.
    #[inline(always)]
    fn set(&self, state: *mut FlowState, backend_id: u32, flow_hash: u32, now: u32) {
        // SAFETY: a state of the bucket (see `find`); racing writers are covered by the tag.
        unsafe {
            (*state).flow_hash = flow_hash;
            (*state).last_seen = now;
            let pair: u64 = core::mem::transmute([backend_id, self.tag]);
            core::ptr::write_volatile(state.cast::<u64>(), pair);
        }
    }

    /// Remember `key`'s flow in the way `flowtab::victim` picks (an empty one, else the one
    /// idle longest).
    #[inline(always)]
    fn insert(&self, key: &[u32; N], backend_id: u32, flow_hash: u32, now: u32) {
        let mut tags = [0u32; WAYS];
        let mut seen = [0u32; WAYS];
        for way in 0..WAYS {
            // SAFETY: as in `find`.
            unsafe {
                tags[way] = (*self.state(way)).tag;
                seen[way] = (*self.state(way)).last_seen;
            }
        }
        let way = flowtab::victim(tags, seen, now);
        let k = self.key(way);
        for (i, w) in key.iter().enumerate() {
            // SAFETY: as in `find`.
            unsafe { *k.add(i) = *w };
        }
        self.set(self.state(way), backend_id, flow_hash, now);
    }
}

/// May this CPU create another flow entry now (`now` in jiffies)? Counts the creation if so.
#[inline(always)]
fn flood_guard_allows(now: u64, cfg: &NodeConfig) -> bool {
    let Some(w) = LB_FLOOD.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: a per-CPU slot is only touched by this CPU while the program runs.
    unsafe {
        if now.wrapping_sub((*w).start) >= cfg.hz as u64 {
            (*w).start = now;
            (*w).created = 0;
        }
        if (*w).created >= cfg.new_flows_per_cpu_s as u64 {
            return false;
        }
        (*w).created += 1;
    }
    true
}

/// The backend of a client of a service with session affinity: its remembered one while
/// fresh and still in the service, else Maglev on the client's address (remembered, except
/// for ICMP errors). `now` in jiffies (`cfg.hz` per second). Returns whether the decision
/// is new.
#[inline(always)]
fn affine(
    pkt: &Packet,
    service: &ServiceValue,
    cfg: &NodeConfig,
    now: u64,
    bytes: u64,
) -> Result<(u32, &'static BackendValue, bool), Verdict> {
    let key = AffinityKey::new(service.id, pkt.family, addr_bytes(pkt.src));
    if let Some(entry) = LB_AFFINITY.get_ptr_mut(&key) {
        // SAFETY: the entry stays valid during this program run (RCU); racing updates of
        // `last_seen` are benign.
        let (id, seen) = unsafe { ((*entry).backend_id, (*entry).last_seen) };
        if now.wrapping_sub(seen) <= service.affinity_timeout_s as u64 * cfg.hz as u64
            && let Some(backend) = live_backend_of(id, service)
        {
            // SAFETY: as above.
            unsafe { (*entry).last_seen = now };
            // The client keeps its backend: it waits for the MAC, like a new client.
            reachable(backend)?;
            stats::count_reason(Reason::AffinityHit, bytes);
            return Ok((id, backend, false));
        }
    }
    let (id, backend) = maglev(hash_of(pkt, 0, 0), service, bytes)?;
    if !pkt.icmp_error {
        let value = FlowValue {
            backend_id: id,
            flow_hash: 0,
            last_seen: now,
        };
        let _ = LB_AFFINITY.insert(&key, &value, ANY);
    }
    Ok((id, backend, true))
}

/// Choose the backend for a packet of `service`.
#[inline(always)]
pub fn select(
    pkt: &Packet,
    service: &ServiceValue,
    cfg: &NodeConfig,
    bytes: u64,
) -> Result<Selected, Verdict> {
    // Fragments are balanced statelessly on addresses and protocol (their ports are zero),
    // so every fragment of a datagram, first or later, reaches the same backend.
    let tracked = service.flags & SERVICE_F_FLOW_TRACKING != 0 && !pkt.fragment;
    let affinity = service.flags & SERVICE_F_AFFINITY != 0 && !pkt.fragment;
    if !tracked && !affinity {
        let hash = flow_hash(pkt);
        let (backend_id, backend) = maglev(hash, service, bytes)?;
        return Ok(Selected {
            backend_id,
            backend,
            new_flow: true,
            flow_hash: hash,
        });
    }
    // Jiffies, not a clock in ns: the verifier turns this helper into one load, while
    // `bpf_ktime_get_coarse_ns` stays a call (about 2 ns per packet).
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_jiffies64() };
    if !tracked {
        let (backend_id, backend, new_flow) = affine(pkt, service, cfg, now, bytes)?;
        return Ok(Selected {
            backend_id,
            backend,
            new_flow,
            flow_hash: 0,
        });
    }
    // Keys as the words they are compared with; the hash takes IPv6 addresses folded.
    let (s, d, ports) = (pkt.src, pkt.dst, pkt.ports);
    if pkt.family == FAMILY_V4 {
        let key = [s[0], d[0], ports, pkt.proto as u32];
        follow_flow::<Flows4, 4>(&key, key, pkt, service, cfg, now, bytes, affinity)
    } else {
        let last = pkt.proto as u32 | ((pkt.family as u32) << 8);
        let key = [s[0], s[1], s[2], s[3], d[0], d[1], d[2], d[3], ports, last];
        let hash_in = [pkt.src_fold, pkt.dst_fold, ports, last];
        follow_flow::<Flows6, 10>(&key, hash_in, pkt, service, cfg, now, bytes, affinity)
    }
}

/// A packet of a tracked service, whose flow has `key` in table `T` (`hash_in`: the inputs
/// of its `flowtab::key_hash`); `now` in jiffies.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn follow_flow<T: FlowTable<N>, const N: usize>(
    key: &[u32; N],
    hash_in: [u32; 4],
    pkt: &Packet,
    service: &ServiceValue,
    cfg: &NodeConfig,
    now: u64,
    bytes: u64,
    affinity: bool,
) -> Result<Selected, Verdict> {
    // Entries hold the low half of jiffies; differences wrap correctly.
    let now32 = now as u32;
    let place = Place::<N>::of::<T>(cfg, hash_in);
    let entry = place.as_ref().and_then(|p| p.find(key));
    if !pkt.tcp_syn
        && let Some((flow, id)) = entry
    {
        let idle_s = if pkt.proto == PROTO_TCP {
            cfg.tcp_idle_s
        } else {
            cfg.udp_idle_s
        };
        // SAFETY: the bucket is a map value, valid during this run; racing updates of
        // `last_seen` are benign.
        let (seen, flow_hash) = unsafe { ((*flow).last_seen, (*flow).flow_hash) };
        if now32.wrapping_sub(seen) as u64 <= idle_s as u64 * cfg.hz as u64 {
            if let Some(backend) = live_backend_of(id, service) {
                // SAFETY: as above.
                unsafe { (*flow).last_seen = now32 };
                // The flow keeps its backend (dropped, not moved) until the MAC is known.
                reachable(backend)?;
                return Ok(Selected {
                    backend_id: id,
                    backend,
                    new_flow: false,
                    flow_hash,
                });
            }
            stats::count_reason(Reason::FlowRerouted, bytes);
        }
    }
    let (backend_id, backend, hash) = if affinity {
        let (id, backend, _) = affine(pkt, service, cfg, now, bytes)?;
        (id, backend, 0)
    } else {
        let hash = flow_hash(pkt);
        let (id, backend) = maglev(hash, service, bytes)?;
        (id, backend, hash)
    };
    if pkt.icmp_error {
        // An error about a flow is not a flow: follow it, never remember it.
        return Ok(Selected {
            backend_id,
            backend,
            new_flow: false,
            flow_hash: hash,
        });
    }
    if pkt.tcp_syn {
        // A new connection is remembered from its next packet on (a miss decided by the
        // same Maglev choice), so a flood of SYNs never fills the table; a SYN only
        // re-points an entry its 5-tuple already has (a reused port).
        if let (Some(p), Some((flow, _))) = (&place, entry) {
            p.set(flow, backend_id, hash, now32);
        }
        return Ok(Selected {
            backend_id,
            backend,
            new_flow: true,
            flow_hash: hash,
        });
    }
    if let Some(p) = &place {
        if flood_guard_allows(now, cfg) {
            match entry {
                // A stale entry is renewed where it is.
                Some((flow, _)) => p.set(flow, backend_id, hash, now32),
                None => p.insert(key, backend_id, hash, now32),
            }
            stats::count_reason(Reason::FlowCreated, bytes);
        } else {
            stats::count_reason(Reason::FlowGuarded, bytes);
        }
    }
    Ok(Selected {
        backend_id,
        backend,
        new_flow: true,
        flow_hash: hash,
    })
}
