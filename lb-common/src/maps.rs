//! Map names and default sizes. The eBPF side declares each map under exactly these names;
//! the agent opens and pins them by the same constants. Names stay within the kernel's 15
//! characters so `bpftool map show` prints them whole.

/// `ServiceKey` → `ServiceValue`.
pub const SERVICES: &str = "LB_SERVICES";
/// Backend id (`u32`) → `BackendValue`.
pub const BACKENDS: &str = "LB_BACKENDS";
/// Slot (`u32`) → backend id (`u32`); every service owns a contiguous region of it.
pub const MAGLEV: &str = "LB_MAGLEV";
/// Index 0 → `NodeConfig`.
pub const CONFIG: &str = "LB_CONFIG";
/// Per CPU, service id → `Counters`.
pub const SERVICE_STATS: &str = "LB_SVC_STATS";
/// Per CPU, backend id → `Counters`.
pub const BACKEND_STATS: &str = "LB_BE_STATS";
/// Per CPU, `Reason` → `Counters`.
pub const REASON_STATS: &str = "LB_REASONS";
/// Array of `FlowBucket4`: the IPv4 flows (see [`crate::flowtab`]).
pub const FLOWTAB4: &str = "LB_FLOWTAB4";
/// Array of `FlowBucket6`: the IPv6 flows.
pub const FLOWTAB6: &str = "LB_FLOWTAB6";
/// The flow tables of earlier versions, LRU hashes of `FlowValue`: `LB_FLOWS` (`FlowKey`,
/// both families), then `LB_FLOWS4` (`FlowKeyV4`) and `LB_FLOWS6` (`FlowKey`). The loader
/// moves their entries into `LB_FLOWTAB4`/`LB_FLOWTAB6` and removes them.
pub const LEGACY_FLOWS: &str = "LB_FLOWS";
pub const LEGACY_FLOWS4: &str = "LB_FLOWS4";
pub const LEGACY_FLOWS6: &str = "LB_FLOWS6";
/// Per CPU, index 0 → `FloodWindow`.
pub const FLOOD: &str = "LB_FLOOD";
/// `VipKey` → `VipValue`: every VIP, for ICMP echo.
pub const VIPS: &str = "LB_VIPS";
/// LPM trie: (service id, client prefix) → 1, the allow lists of services that have one.
pub const SRC_RANGES: &str = "LB_SRC_RANGES";
/// LRU hash: `AffinityKey` → `FlowValue`, the backend of each client of a
/// `sessionAffinity: ClientIP` service.
pub const AFFINITY: &str = "LB_AFFINITY";
/// Hash: `DnatKey` → `DnatValue`, the endpoints on this node and their target ports.
pub const DNAT: &str = "LB_DNAT";
/// LRU hash: `FlowKey` of a reply (endpoint → client) → `RevNatValue`, the VIP and port the
/// client used.
pub const REVNAT: &str = "LB_REVNAT";
/// LRU hash: `FragKey` of a fragmented reply → `RevNatValue`, so its later fragments (which
/// have no ports) get the VIP its first fragment got.
pub const REVNAT_FRAG: &str = "LB_REVNAT_FRAG";
/// Fragmented replies remembered at once (a datagram's fragments leave within moments).
pub const MAX_REVNAT_FRAGS: u32 = 16_384;
/// Program array: slot [`PROGS_DECAP`] holds `lb_decap`, tail-called by `lb_xdp` for tunnel
/// packets to this node's endpoints.
pub const PROGS: &str = "LB_PROGS";
pub const PROGS_DECAP: u32 = 0;
/// Clients remembered for session affinity (all services).
pub const MAX_AFFINITY: u32 = 65_536;
/// Translated flows remembered for their replies.
pub const MAX_REVNAT: u32 = 131_072;
/// Array of `SVC_SLOT_COUNT` `u32`, indexed by [`crate::hash::service_slot`] of a packet's
/// (destination, port, protocol): `SLOT_EMPTY` (no service there: the packet is not for a
/// VIP), `SLOT_SHARED` (several services: look in `LB_SERVICES`) or `slot_value` of the one
/// service's current record in `LB_SVC_RECORDS`.
pub const SVC_SLOTS: &str = "LB_SVC_SLOTS";
pub const SVC_SLOT_COUNT: u32 = 1 << SVC_SLOT_BITS;
pub const SVC_SLOT_BITS: u32 = 16;
/// Array of `ServiceRecord`, two per service id (`record_index`).
pub const SVC_RECORDS: &str = "LB_SVC_RECORDS";
/// Index 0 → `u64`, the answer lease: `lb_xdp` answers ARP requests and Neighbor
/// Solicitations for the VIPs this node owns (`VIP_F_ANSWER`) only while `bpf_jiffies64()`
/// is below it; 0 (as created): for none. The L2 announcement renews it with every heartbeat
/// to `dead_after` ahead, so a node whose agent died stops answering when the other nodes
/// take its VIPs over, though its program stays attached. Mmapable: the agent writes it
/// with one 8-byte store, which a reader never sees half done.
pub const L2_LEASE: &str = "LB_L2_LEASE";
/// LPM trie: `DecapAddr` prefix → 1, the outer sources `lb_decap` accepts tunnel packets
/// from (the load-balancer nodes). A tunnel packet from anyone else passes untouched.
pub const DECAP_SRC: &str = "LB_DECAP_SRC";
/// LPM trie: `DecapAddr` prefix → 1, the outer destinations `lb_decap` accepts: this node's
/// own addresses and its local endpoints' (pods are tunnelled to directly).
pub const DECAP_DST: &str = "LB_DECAP_DST";
/// Entries of each of `LB_DECAP_SRC` and `LB_DECAP_DST`.
pub const MAX_DECAP_ADDRS: u32 = 16_384;
/// Maps earlier versions pinned and this one no longer has: the loader removes their pins.
pub const RETIRED: [&str; 1] = ["LB_VIP_BITS"];
/// Allow-list entries over all services.
pub const MAX_SRC_RANGES: u32 = 65_536;

/// Every map the load balancer pins, in the order `lb-agent status` reads them.
pub const ALL: [&str; 22] = [
    SERVICES,
    BACKENDS,
    MAGLEV,
    CONFIG,
    SERVICE_STATS,
    BACKEND_STATS,
    REASON_STATS,
    FLOWTAB4,
    FLOWTAB6,
    FLOOD,
    VIPS,
    SRC_RANGES,
    AFFINITY,
    DNAT,
    REVNAT,
    PROGS,
    SVC_SLOTS,
    SVC_RECORDS,
    L2_LEASE,
    DECAP_SRC,
    DECAP_DST,
    REVNAT_FRAG,
];

/// Distinct (VIP, port, protocol) entries; also the size of the per-service counter array.
pub const MAX_SERVICES: u32 = 32_768;
/// Backend entries: one per (service, backend address).
pub const MAX_BACKENDS: u32 = 131_072;
/// Default size of the IPv4 flow table (entries, shared by all CPUs; 32 bytes each).
pub const DEFAULT_FLOWS: u32 = 1 << 20;

/// Entries of the IPv6 flow table for an IPv4 table of `flows`: a quarter (IPv6 entries are
/// larger, 56 bytes, and most traffic is IPv4), at least 1024.
pub const fn flows6_for(flows: u32) -> u32 {
    let quarter = flows / 4;
    if quarter < 1024 { 1024 } else { quarter }
}
/// `BPF_F_NO_COMMON_LRU`: each CPU evicts from its own LRU list.
pub const LRU_PER_CPU_FLAG: usize = 1 << 1;
/// `BPF_F_MMAPABLE` (Linux 5.5+), on `LB_MAGLEV`: the agent writes tables through a memory
/// mapping of the array instead of one syscall per slot. Lookups from BPF are unchanged.
pub const MMAPABLE_FLAG: usize = 1 << 10;
/// Default capacity of `LB_MAGLEV` in slots (the kernel stores 8 bytes each: 32 MiB). The agent may load the
/// program with a different capacity; it must hold every table twice during a replacement.
pub const DEFAULT_MAGLEV_SLOTS: u32 = 4 * 1024 * 1024;

/// Names of the programs in the object.
pub const PROG_LB: &str = "lb_xdp";
pub const PROG_DECAP: &str = "lb_decap";
pub const PROG_REVNAT: &str = "lb_revnat";
/// Returns the kernel's jiffies; never attached, run by the agent to measure HZ.
pub const PROG_CLOCK: &str = "lb_clock";
