//! Every map of the data plane. Names, sizes and value types come from `lb_common`.

use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray},
    macros::btf_map,
};
use lb_common::{
    AffinityKey, BackendValue, Counters, DecapAddr, DnatKey, DnatValue, FloodWindow, FlowBucket4,
    FlowBucket6, FlowKey, FlowValue, FragKey, NodeConfig, Reason, RevNatValue, ServiceCounters,
    ServiceKey, ServiceRecord, ServiceValue, SourceRange, VipKey, VipValue,
    flowtab::buckets_for,
    maps::{
        DEFAULT_FLOWS, DEFAULT_MAGLEV_SLOTS, LRU_PER_CPU_FLAG, MAX_AFFINITY, MAX_BACKENDS,
        MAX_DECAP_ADDRS, MAX_REVNAT, MAX_REVNAT_FRAGS, MAX_SERVICES, MAX_SRC_RANGES, MMAPABLE_FLAG,
        SVC_SLOT_COUNT, flows6_for,
    },
};

#[btf_map]
pub static LB_SERVICES: HashMap<ServiceKey, ServiceValue, { MAX_SERVICES as usize }> =
    HashMap::new();

#[btf_map]
pub static LB_BACKENDS: Array<BackendValue, { MAX_BACKENDS as usize }> = Array::new();

/// Mmapable, so the agent writes whole tables as memory (see `MMAPABLE_FLAG`).
#[btf_map]
pub static LB_MAGLEV: Array<u32, { DEFAULT_MAGLEV_SLOTS as usize }, MMAPABLE_FLAG> = Array::new();

#[btf_map]
pub static LB_CONFIG: Array<NodeConfig, 1> = Array::new();

#[btf_map]
pub static LB_SVC_STATS: PerCpuArray<ServiceCounters, { MAX_SERVICES as usize }> =
    PerCpuArray::new();

#[btf_map]
pub static LB_BE_STATS: PerCpuArray<Counters, { MAX_BACKENDS as usize }> = PerCpuArray::new();

#[btf_map]
pub static LB_REASONS: PerCpuArray<Counters, { Reason::COUNT as usize }> = PerCpuArray::new();

/// Sized by the agent when it creates the tables; `NodeConfig` says how many buckets.
#[btf_map]
pub static LB_FLOWTAB4: Array<FlowBucket4, { buckets_for(DEFAULT_FLOWS) as usize }> = Array::new();

#[btf_map]
pub static LB_FLOWTAB6: Array<FlowBucket6, { buckets_for(flows6_for(DEFAULT_FLOWS)) as usize }> =
    Array::new();

#[btf_map]
pub static LB_FLOOD: PerCpuArray<FloodWindow, 1> = PerCpuArray::new();

#[btf_map]
pub static LB_VIPS: HashMap<VipKey, VipValue, { MAX_SERVICES as usize }> = HashMap::new();

/// Value 1 for every allowed (service, client prefix).
#[btf_map]
pub static LB_SRC_RANGES: LpmTrie<SourceRange, u32, { MAX_SRC_RANGES as usize }> = LpmTrie::new();

#[btf_map]
pub static LB_AFFINITY: LruHashMap<
    AffinityKey,
    FlowValue,
    { MAX_AFFINITY as usize },
    LRU_PER_CPU_FLAG,
> = LruHashMap::new();

/// One entry per (service, local endpoint).
#[btf_map]
pub static LB_DNAT: HashMap<DnatKey, DnatValue, { MAX_BACKENDS as usize }> = HashMap::new();

#[btf_map]
pub static LB_REVNAT: LruHashMap<FlowKey, RevNatValue, { MAX_REVNAT as usize }, LRU_PER_CPU_FLAG> =
    LruHashMap::new();

/// The later fragments of fragmented replies (`lb_common::maps::REVNAT_FRAG`).
#[btf_map]
pub static LB_REVNAT_FRAG: LruHashMap<
    FragKey,
    RevNatValue,
    { MAX_REVNAT_FRAGS as usize },
    LRU_PER_CPU_FLAG,
> = LruHashMap::new();

#[btf_map]
pub static LB_SVC_SLOTS: Array<u32, { SVC_SLOT_COUNT as usize }> = Array::new();

/// Two records per service id (`lb_common::record_index`).
#[btf_map]
pub static LB_SVC_RECORDS: Array<ServiceRecord, { 2 * MAX_SERVICES as usize }> = Array::new();

#[btf_map]
pub static LB_PROGS: ProgramArray<1> = ProgramArray::new();

/// The answer lease (`lb_common::maps::L2_LEASE`): read by the ARP/NS responder only.
#[btf_map]
pub static LB_L2_LEASE: Array<u64, 1, MMAPABLE_FLAG> = Array::new();

/// Value 1 for every outer source prefix `lb_decap` accepts (`DecapAddr`).
#[btf_map]
pub static LB_DECAP_SRC: LpmTrie<DecapAddr, u32, { MAX_DECAP_ADDRS as usize }> = LpmTrie::new();

/// Value 1 for every outer destination `lb_decap` accepts: this node's addresses and its
/// local endpoints'.
#[btf_map]
pub static LB_DECAP_DST: LpmTrie<DecapAddr, u32, { MAX_DECAP_ADDRS as usize }> = LpmTrie::new();
