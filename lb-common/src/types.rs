//! Keys and values of the BPF maps. Layouts are fixed (`repr(C)`, explicit padding, asserted
//! sizes) because the kernel copies them byte for byte between the two sides.

use core::mem::size_of;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_IPIP: u8 = 4;
/// IPv6 encapsulated in IPv4 or IPv6 (`41`).
pub const PROTO_IPV6: u8 = 41;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;
/// Default UDP port of GUE encapsulation.
pub const DEFAULT_GUE_PORT: u16 = 6080;

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// How a service's packets reach the chosen backend.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Forwarding {
    /// IP-in-IP: an outer IP header of the backend's family from the node's encapsulation
    /// source to the backend (IPIP, IP6IP6, 4in6 or 6in4).
    Ipip = 1,
    /// Rewrite the Ethernet addresses only; the backend must be on the same L2 segment.
    L2 = 2,
    /// Outer IP + UDP to the node's GUE port, the inner IP packet right after the UDP header
    /// (GUE variant 1, as Linux FOU); the UDP source port carries the flow hash for ECMP.
    Gue = 3,
}

impl Forwarding {
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Forwarding::Ipip),
            2 => Some(Forwarding::L2),
            3 => Some(Forwarding::Gue),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Forwarding::Ipip => "ipip",
            Forwarding::L2 => "l2",
            Forwarding::Gue => "gue",
        }
    }
}

/// (VIP, port, protocol). IPv4 addresses occupy the first four bytes of `addr_be`, the rest
/// zero; `family` says which.
/// Aligned to 4 so the data plane compares keys as five words.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    pub addr_be: [u8; 16],
    pub port_be: u16,
    pub proto: u8,
    pub family: u8,
}
const _: () = assert!(size_of::<ServiceKey>() == 20);

impl ServiceKey {
    pub const fn v4(addr_be: [u8; 4], port_be: u16, proto: u8) -> Self {
        let mut a = [0u8; 16];
        a[0] = addr_be[0];
        a[1] = addr_be[1];
        a[2] = addr_be[2];
        a[3] = addr_be[3];
        ServiceKey {
            addr_be: a,
            port_be,
            proto,
            family: FAMILY_V4,
        }
    }
}

/// An IPv4 address as 16 bytes (first four; the rest zero), as every shared key holds it.
/// Built from words: a zeroed byte array written in part becomes a byte-loop `memset` call in
/// BPF code.
#[inline(always)]
pub const fn addr16_v4(a: [u8; 4]) -> [u8; 16] {
    let words = [u32::from_ne_bytes(a), 0, 0, 0];
    // SAFETY: same size, every bit pattern valid.
    unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(words) }
}

/// An `LB_SVC_RECORDS` entry: a service's key (checked against the packet) and value, so the
/// data plane finds a service through two array reads instead of a hash-map lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceRecord {
    pub key: ServiceKey,
    pub _pad: [u8; 4],
    pub value: ServiceValue,
}
const _: () = assert!(size_of::<ServiceRecord>() == 56);

/// `LB_SVC_SLOTS` value: no service hashes to this slot (so the packet is for none).
pub const SLOT_EMPTY: u32 = 0;
/// `LB_SVC_SLOTS` value: several services hash to this slot; look the key up in
/// `LB_SERVICES`.
pub const SLOT_SHARED: u32 = u32::MAX;

/// The `LB_SVC_RECORDS` index of bank `bank` (0 or 1) of service `id`. Each service has two,
/// so the agent writes a changed record into the bank the data plane is not reading, then
/// switches the service's slot to it with one 4-byte write.
pub const fn record_index(id: u32, bank: u32) -> u32 {
    id * 2 + (bank & 1)
}

/// The `LB_SVC_SLOTS` value that points at record `index`.
pub const fn slot_value(index: u32) -> u32 {
    index + 1
}

/// Service flags.
/// Remember each flow's backend in `LB_FLOWTAB4`/`LB_FLOWTAB6`, so established connections keep their backend
/// when the backend set changes.
pub const SERVICE_F_FLOW_TRACKING: u8 = 1;
/// Only clients in the service's entries of `LB_SRC_RANGES` are balanced; others are
/// dropped.
pub const SERVICE_F_SOURCE_RANGES: u8 = 2;
/// `sessionAffinity: ClientIP`: each client (source address) keeps its backend in
/// `LB_AFFINITY` for `affinity_timeout_s` after its last packet; a new client is placed by
/// Maglev on its address alone, so every node places it alike.
pub const SERVICE_F_AFFINITY: u8 = 4;

/// Data of an `LB_SRC_RANGES` key (after the LPM prefix length): the service id, then the
/// client address. The prefix length counts the 32 bits of the id plus the address bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourceRange {
    pub service_id_be: [u8; 4],
    pub addr_be: [u8; 16],
}
const _: () = assert!(size_of::<SourceRange>() == 20);

/// What the data plane needs to balance one service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceValue {
    /// Index into `LB_SVC_STATS`.
    pub id: u32,
    /// First slot of this service's Maglev table in `LB_MAGLEV`.
    pub table_offset: u32,
    /// Number of slots (a prime); 0 means "no backends".
    pub table_size: u32,
    /// A `Forwarding` discriminant.
    pub forwarding: u8,
    /// `SERVICE_F_*`.
    pub flags: u8,
    pub _pad: [u8; 2],
    /// Agent bookkeeping: hash of the table contents, so a restarted agent can tell whether
    /// the table in the map is the one it wants without reading it back.
    pub fingerprint: u64,
    /// Session affinity timeout (seconds), with `SERVICE_F_AFFINITY`.
    pub affinity_timeout_s: u32,
    pub _pad2: [u8; 4],
}
const _: () = assert!(size_of::<ServiceValue>() == 32);

/// Backend flags.
pub const BACKEND_F_VALID: u8 = 1;
/// The backend is on this node (a local pod): the packet is not sent out but decapsulated
/// and translated here (`LB_DNAT`), and the stack delivers it.
pub const BACKEND_F_LOCAL: u8 = 2;
/// The next hop's MAC address is not known yet (`mac` is zero): the agent is still
/// resolving it (a new backend). The backend is a member of its service's Maglev table all
/// the same, so every node builds the same table from the same backend set; the data plane
/// drops (`DropNoNeighbor`) what would go to it, creating no flow or affinity entry, until
/// the agent learns the MAC and rewrites this entry.
pub const BACKEND_F_NO_NEIGH: u8 = 4;
/// The next hop failed to resolve (the kernel's neighbour entry went FAILED: nobody
/// answered ARP/ND): the backend's node is gone. It keeps its slots, and what they would
/// send it goes to the backend of the next slot that can take it
/// ([`crate::hash::fallback_slot`]); its remembered flows and clients are decided afresh
/// the same way. Every node that sees the neighbour fail makes the same choice.
pub const BACKEND_F_UNREACHABLE: u8 = 8;
/// The backend (a pod) is reached through its node: the tunnel goes to `via_be` (the
/// node's address, routable where pod addresses are not, as on overlay networks), always
/// as GUE whose header carries the pod's address ([`gue_pod_header`]), and that node's
/// decap program translates to the pod as it does for a tunnel addressed to the pod.
pub const BACKEND_F_VIA_NODE: u8 = 16;

/// The GUE header (in wire order) of a tunnel to a pod through its node
/// ([`BACKEND_F_VIA_NODE`]) whose inner packet is of `family`: variant 0, not a control
/// message, `hlen` = the words of private data that follow, which hold the pod's address
/// (1 word for IPv4, 4 for IPv6); protocol of the inner packet (IPIP 4 or IPv6 41); no
/// flags. The inner packet follows the address.
pub const fn gue_pod_header(family: u8) -> [u8; 4] {
    if family == crate::FAMILY_V4 {
        [1, crate::PROTO_IPIP, 0, 0]
    } else {
        [4, crate::PROTO_IPV6, 0, 0]
    }
}

/// One backend of one service (a backend address used by two services has two entries, so
/// each can be removed, and counted, on its own), and the MAC address of the next hop.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendValue {
    pub addr_be: [u8; 16],
    /// Destination MAC for frames to this backend: its own for on-link backends, the
    /// gateway's otherwise.
    pub mac: [u8; 6],
    pub family: u8,
    /// `BACKEND_F_*`; an entry without `BACKEND_F_VALID` is free.
    pub flags: u8,
    /// The service (`ServiceValue::id`) this entry belongs to. A remembered flow is only
    /// followed to a backend that still belongs to the flow's service.
    pub service_id: u32,
    pub _pad: [u8; 4],
    /// With [`BACKEND_F_VIA_NODE`]: the outer destination, the address of the backend's
    /// node (same family as `addr_be`); zero otherwise.
    pub via_be: [u8; 16],
}
const _: () = assert!(size_of::<BackendValue>() == 48);
// The data plane reads the addresses as words and the MAC as half-words.
const _: () = assert!(
    align_of::<BackendValue>() >= 4
        && core::mem::offset_of!(BackendValue, addr_be) % 4 == 0
        && core::mem::offset_of!(BackendValue, via_be) % 4 == 0
        && core::mem::offset_of!(BackendValue, mac) % 2 == 0
);

impl BackendValue {
    pub const EMPTY: BackendValue = BackendValue {
        addr_be: [0; 16],
        mac: [0; 6],
        family: 0,
        flags: 0,
        service_id: 0,
        _pad: [0; 4],
        via_be: [0; 16],
    };

    pub const fn is_valid(&self) -> bool {
        self.flags & BACKEND_F_VALID != 0
    }

    /// Whether the backend's next hop failed to resolve (`BACKEND_F_UNREACHABLE`).
    #[inline(always)]
    pub const fn is_unreachable(&self) -> bool {
        self.flags & BACKEND_F_UNREACHABLE != 0
    }

    /// Whether packets can be sent to it now: its next hop's MAC is known.
    #[inline(always)]
    pub const fn can_take(&self) -> bool {
        self.flags & (BACKEND_F_NO_NEIGH | BACKEND_F_UNREACHABLE) == 0
    }
}

/// Node configuration flags.
pub const CONFIG_F_VALID: u32 = 1;
/// A packet that would not fit the MTU once encapsulated is answered with ICMP
/// "fragmentation needed" / ICMPv6 "packet too big" (else it is dropped).
pub const CONFIG_F_PMTU_ICMP: u32 = 2;
/// Tunnel packets (IPIP, IP6IP6, 4in6, 6in4, GUE) that are not for a VIP go to the decap
/// program (`LB_PROGS`), which strips them and translates those for local endpoints.
pub const CONFIG_F_DECAP: u32 = 4;

/// Per-node settings, in `LB_CONFIG[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    /// MAC address of the interface the program is attached to: the source of every frame
    /// it transmits.
    pub mac: [u8; 6],
    /// The kernel's tick rate (`CONFIG_HZ`), measured by the agent: flow and affinity entries
    /// are stamped with `bpf_jiffies64()` (a plain load, where reading a clock in ns is a
    /// helper call per packet), so timeouts in seconds become ticks with it.
    pub hz: u16,
    /// Source address of outer IPv4 headers.
    pub encap_src_v4_be: [u8; 4],
    /// `CONFIG_F_*`.
    pub flags: u32,
    /// A remembered TCP flow idle for longer than this (seconds) is decided afresh.
    pub tcp_idle_s: u32,
    /// Likewise for UDP.
    pub udp_idle_s: u32,
    /// Flood guard: at most this many new flow-table entries per second on each CPU; past
    /// it, new flows are still forwarded by Maglev, just not remembered.
    pub new_flows_per_cpu_s: u32,
    /// Destination port of GUE packets.
    pub gue_port_be: u16,
    /// MTU of the interface: an encapsulated packet must fit in it (0: not checked).
    pub mtu: u16,
    /// Source address of outer IPv6 headers (all zero: no IPv6 encapsulation possible).
    pub encap_src_v6_be: [u8; 16],
    /// Buckets of `LB_FLOWTAB4` and `LB_FLOWTAB6` as loaded (the agent reads them from the
    /// maps: a pinned table keeps the size it was created with).
    pub flow_buckets4: u32,
    pub flow_buckets6: u32,
    /// The node's key of the flow tables' bucket and tag hash
    /// ([`crate::flowtab::key_hash`]): drawn at random by the agent for a new node and read
    /// back from the pinned map on every later start, so remembered flows stay where they
    /// are. Node-local, like the tables; the flow hash Maglev takes is unkeyed.
    pub flow_secret: crate::flowtab::Secret,
}
const _: () = assert!(size_of::<NodeConfig>() == 88);
// The data plane reads the addresses as words and the MAC as half-words.
const _: () = assert!(
    align_of::<NodeConfig>() >= 4
        && core::mem::offset_of!(NodeConfig, encap_src_v4_be) % 4 == 0
        && core::mem::offset_of!(NodeConfig, encap_src_v6_be) % 4 == 0
        && core::mem::offset_of!(NodeConfig, mac) % 2 == 0
        && core::mem::offset_of!(NodeConfig, flow_secret) % 8 == 0
);

impl NodeConfig {
    pub const EMPTY: NodeConfig = NodeConfig {
        mac: [0; 6],
        hz: 0,
        encap_src_v4_be: [0; 4],
        flags: 0,
        tcp_idle_s: 0,
        udp_idle_s: 0,
        new_flows_per_cpu_s: 0,
        gue_port_be: 0,
        mtu: 0,
        encap_src_v6_be: [0; 16],
        flow_buckets4: 0,
        flow_buckets6: 0,
        flow_secret: [0; 4],
    };
}

/// A VIP address (any port), in `LB_VIPS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VipKey {
    pub addr_be: [u8; 16],
    pub family: u8,
    // Padding as scalars: a 3-byte array becomes a byte-loop `memset` call in BPF code.
    pub _pad1: u8,
    pub _pad2: u16,
}
const _: () = assert!(size_of::<VipKey>() == 20);

impl VipKey {
    pub const fn new(addr_be: [u8; 16], family: u8) -> Self {
        VipKey {
            addr_be,
            family,
            _pad1: 0,
            _pad2: 0,
        }
    }
}

/// The load balancer answers ICMP/ICMPv6 echo requests to this VIP.
pub const VIP_F_ECHO: u32 = 1;
/// This node owns the VIP for L2 announcement: `lb_xdp` answers ARP requests (IPv4) and
/// Neighbor Solicitations (IPv6) for it with the node's MAC (`NodeConfig::mac`) by
/// `XDP_TX`, while the agent's answer lease holds (`maps::L2_LEASE`). Set on exactly one
/// node per VIP; every other node leaves such requests to the kernel, which does not own
/// the VIP and stays silent.
pub const VIP_F_ANSWER: u32 = 2;

/// Per-VIP settings.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipValue {
    /// `VIP_F_*`.
    pub flags: u32,
    /// The port of the UDP service of this VIP that takes its UDP fragments (network byte
    /// order; 0: fragments are dropped).
    pub frag_port_udp_be: u16,
    /// Likewise for TCP.
    pub frag_port_tcp_be: u16,
}
const _: () = assert!(size_of::<VipValue>() == 8);

/// IPv4 flow key (`LB_FLOWTAB4`): the 5-tuple as in the packet, in 16 bytes. A key this short
/// compares in a fraction of the time of the 40-byte [`FlowKey`], and makes an entry half a
/// cache line. The data plane compares it as four words ([`FlowKeyV4::from_words`]).
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKeyV4 {
    pub src_be: [u8; 4],
    pub dst_be: [u8; 4],
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub _pad1: u8,
    pub _pad2: u16,
}
const _: () = assert!(size_of::<FlowKeyV4>() == 16);

impl FlowKeyV4 {
    pub const fn new(
        src_be: [u8; 4],
        dst_be: [u8; 4],
        sport_be: u16,
        dport_be: u16,
        proto: u8,
    ) -> Self {
        FlowKeyV4 {
            src_be,
            dst_be,
            sport_be,
            dport_be,
            proto,
            _pad1: 0,
            _pad2: 0,
        }
    }

    /// The key from its four words as they sit in memory: source, destination, the two ports,
    /// the protocol (low byte; the rest zero).
    #[inline(always)]
    pub const fn from_words(words: [u32; 4]) -> Self {
        // SAFETY: same size and alignment; every bit pattern is a valid key.
        unsafe { core::mem::transmute::<[u32; 4], FlowKeyV4>(words) }
    }
}

/// Flow key: the 5-tuple as in the packet (`LB_FLOWTAB6`, `LB_REVNAT`). IPv4 addresses occupy
/// the first four bytes.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src_be: [u8; 16],
    pub dst_be: [u8; 16],
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<FlowKey>() == 40);

impl FlowKey {
    /// The IPv4 key of an IPv4 flow.
    pub const fn narrow(&self) -> Option<FlowKeyV4> {
        if self.family != FAMILY_V4 {
            return None;
        }
        let (s, d) = (self.src_be, self.dst_be);
        Some(FlowKeyV4::new(
            [s[0], s[1], s[2], s[3]],
            [d[0], d[1], d[2], d[3]],
            self.sport_be,
            self.dport_be,
            self.proto,
        ))
    }

    /// The key from its ten words as they sit in memory (see [`FlowKeyV4::from_words`]):
    /// four of source, four of destination, the ports, protocol and family (low two bytes).
    #[inline(always)]
    pub const fn from_words(words: [u32; 10]) -> Self {
        // SAFETY: same size and alignment; every bit pattern is a valid key.
        unsafe { core::mem::transmute::<[u32; 10], FlowKey>(words) }
    }
}

/// A remembered client of a service with session affinity (`LB_AFFINITY`); the flow tables
/// of earlier versions held it too.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowValue {
    /// `LB_BACKENDS` index.
    pub backend_id: u32,
    /// The flow hash (in the flow tables of earlier versions); 0 in `LB_AFFINITY`.
    pub flow_hash: u32,
    /// `bpf_jiffies64()` at the last packet (kernel ticks: `NodeConfig::hz` per second).
    pub last_seen: u64,
}
const _: () = assert!(size_of::<FlowValue>() == 16);

impl FlowValue {
    /// The flow-table state of an entry of an older version's table.
    pub const fn state(&self) -> FlowState {
        FlowState {
            backend_id: self.backend_id,
            tag: 0,
            flow_hash: self.flow_hash,
            last_seen: self.last_seen as u32,
        }
    }
}

/// What a flow table remembers of one flow, after its key (see [`crate::flowtab`]).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowState {
    /// `LB_BACKENDS` index.
    pub backend_id: u32,
    /// [`crate::flowtab::tag`] of the entry's key; 0: the entry is empty. Written and read
    /// together with `backend_id` as one 8-byte word, so a reader racing a writer of the
    /// same entry never takes another flow's backend for its own.
    pub tag: u32,
    /// The flow hash, so a packet that follows its flow does not compute it again for a GUE
    /// source port or an IPv6 flow label; 0 when not known (then it is computed).
    pub flow_hash: u32,
    /// Low 32 bits of `bpf_jiffies64()` at the last packet (`NodeConfig::hz` per second).
    pub last_seen: u32,
}
const _: () = assert!(size_of::<FlowState>() == 16);

/// One entry of `LB_FLOWTAB4`.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEntry4 {
    pub key: FlowKeyV4,
    pub state: FlowState,
}

/// One entry of `LB_FLOWTAB6`.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEntry6 {
    pub key: FlowKey,
    pub state: FlowState,
}

/// A bucket of `LB_FLOWTAB4`: the flows whose [`crate::flowtab::bucket_index`] it is.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowBucket4 {
    pub ways: [FlowEntry4; crate::flowtab::WAYS],
}

/// A bucket of `LB_FLOWTAB6`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowBucket6 {
    pub ways: [FlowEntry6; crate::flowtab::WAYS],
}

// The data plane reads an entry as its key's words followed by the state.
const _: () = assert!(
    size_of::<FlowEntry4>() == 4 * 4 + 16
        && core::mem::offset_of!(FlowEntry4, state) == 4 * 4
        && size_of::<FlowEntry6>() == 4 * 10 + 16
        && core::mem::offset_of!(FlowEntry6, state) == 4 * 10
        && size_of::<FlowBucket4>() == crate::flowtab::WAYS * size_of::<FlowEntry4>()
        && size_of::<FlowBucket6>() == crate::flowtab::WAYS * size_of::<FlowEntry6>()
);

/// Per-CPU state of the flood guard, in `LB_FLOOD[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FloodWindow {
    /// Start of the current one-second window (`bpf_jiffies64()`).
    pub start: u64,
    /// Entries created in it.
    pub created: u64,
}
const _: () = assert!(size_of::<FloodWindow>() == 16);

/// Per-service counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceCounters {
    pub packets: u64,
    pub bytes: u64,
    /// Maglev decisions: flow-table misses, TCP SYNs, and every packet of an untracked
    /// service.
    pub new_flows: u64,
}
const _: () = assert!(size_of::<ServiceCounters>() == 24);

/// A packet and byte counter pair (per CPU in the maps).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(size_of::<Counters>() == 16);

/// A client of a service with session affinity, in `LB_AFFINITY`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub service_id: u32,
    pub family: u8,
    pub _pad1: u8,
    pub _pad2: u16,
    pub client_be: [u8; 16],
}
const _: () = assert!(size_of::<AffinityKey>() == 24);

impl AffinityKey {
    pub const fn new(service_id: u32, family: u8, client_be: [u8; 16]) -> Self {
        AffinityKey {
            service_id,
            family,
            _pad1: 0,
            _pad2: 0,
            client_be,
        }
    }
}

/// An endpoint on this node for one service: packets for (`vip`, `port`, `proto`) that
/// arrive tunnelled to `backend` are delivered to `backend`:`DnatValue::target_port_be`.
///
/// With `port_be` = [`DNAT_FRAGMENTS`] the entry says instead that the endpoint is a backend
/// of the service that takes the VIP's fragments of `proto`: a later fragment (no ports) is
/// delivered to `backend` with its address translated only, and a first fragment is
/// translated as a whole packet of its own port would be.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DnatKey {
    pub vip_be: [u8; 16],
    pub backend_be: [u8; 16],
    pub port_be: u16,
    pub proto: u8,
    pub family: u8,
}
const _: () = assert!(size_of::<DnatKey>() == 36);

/// `DnatKey::port_be` of the fragments entry (no service has port 0).
pub const DNAT_FRAGMENTS: u16 = 0;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnatValue {
    /// The port the endpoint listens on (the Service's `targetPort`).
    pub target_port_be: u16,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<DnatValue>() == 4);

/// What a reply of a translated flow must look like again: it leaves from the VIP and the
/// service port, as the client expects. Keyed by the reply's own `FlowKey`
/// (endpoint address and target port → client address and port).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RevNatValue {
    pub vip_be: [u8; 16],
    pub port_be: u16,
    pub _pad1: u16,
    pub _pad2: u32,
}
const _: () = assert!(size_of::<RevNatValue>() == 24);

impl RevNatValue {
    pub const fn new(vip_be: [u8; 16], port_be: u16) -> Self {
        RevNatValue {
            vip_be,
            port_be,
            _pad1: 0,
            _pad2: 0,
        }
    }
}

/// One fragmented reply of a translated flow, as `lb_revnat` saw its first fragment: the
/// reply's endpoint (source) and client (destination) addresses, protocol and IP
/// identification (IPv4: 16 bits in network order in the first two bytes of `id`; IPv6: the
/// fragment header's 32 bits). The later fragments carry no ports, so they are matched by
/// this and get the first fragment's VIP (`RevNatValue`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FragKey {
    pub src_be: [u8; 16],
    pub dst_be: [u8; 16],
    pub id: [u8; 4],
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<FragKey>() == 40);

#[cfg(test)]
mod tests {
    use super::*;

    // The data plane builds keys from words, the agent from fields (migration, tests): both
    // must give the same bytes, or an entry written by one is never found by the other.
    #[test]
    fn flow_keys_from_words_match_keys_from_fields() {
        let (src, dst) = ([198, 18, 1, 2], [198, 18, 0, 100]);
        let (sport, dport) = (40000u16.to_be(), 80u16.to_be());
        let s = sport.to_ne_bytes();
        let d = dport.to_ne_bytes();
        let ports = u32::from_ne_bytes([s[0], s[1], d[0], d[1]]);
        let v4 =
            FlowKeyV4::from_words([u32::from_ne_bytes(src), u32::from_ne_bytes(dst), ports, 6]);
        assert_eq!(v4, FlowKeyV4::new(src, dst, sport, dport, 6));

        let a = [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        let b = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];
        let w = |x: &[u8; 16], i: usize| u32::from_ne_bytes([x[i], x[i + 1], x[i + 2], x[i + 3]]);
        let v6 = FlowKey::from_words([
            w(&a, 0),
            w(&a, 4),
            w(&a, 8),
            w(&a, 12),
            w(&b, 0),
            w(&b, 4),
            w(&b, 8),
            w(&b, 12),
            ports,
            6 | ((FAMILY_V6 as u32) << 8),
        ]);
        let fields = FlowKey {
            src_be: a,
            dst_be: b,
            sport_be: sport,
            dport_be: dport,
            proto: 6,
            family: FAMILY_V6,
            _pad: [0; 2],
        };
        assert_eq!(v6, fields);
        assert_eq!(fields.narrow(), None);
    }

    #[test]
    fn ipv4_addresses_fill_the_first_word() {
        let a = addr16_v4([198, 18, 0, 1]);
        assert_eq!(a[..4], [198, 18, 0, 1]);
        assert!(a[4..].iter().all(|b| *b == 0));
    }
}

/// Data of an `LB_DECAP_SRC` / `LB_DECAP_DST` key (after the LPM prefix length): the family
/// in the first 32 bits, then the address, so one trie holds both families. The prefix
/// length counts those 32 bits plus the address bits (`DecapAddr::FAMILY_BITS + prefix`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DecapAddr {
    pub family: u8,
    // Padding as scalars, as in `VipKey`.
    pub _pad1: u8,
    pub _pad2: u16,
    pub addr_be: [u8; 16],
}
const _: () = assert!(size_of::<DecapAddr>() == 20);

impl DecapAddr {
    /// Bits of the key before the address.
    pub const FAMILY_BITS: u32 = 32;

    pub const fn new(addr_be: [u8; 16], family: u8) -> Self {
        DecapAddr {
            family,
            _pad1: 0,
            _pad2: 0,
            addr_be,
        }
    }
}
